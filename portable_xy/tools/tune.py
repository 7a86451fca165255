"""Offline tile tuner: ``portable-xy kernels tune --backend {cuda,rocm,npu,interpret}``.

Nothing is tuned on the serving hot path (see ``profile.py``): this command times candidate tiles
once, on the device at hand, and writes a profile file that ``load_profile`` layers over the
shipped ones (``tuned_profile_dir()/<vendor>/<arch>.yaml`` unless ``--out``).

What is tuned
    * the SmoothGEMM tile menu ``gemm.tiles``: every candidate tile (a per-backend pool that meets
      the backend's on-chip limits, plus the shipped menu) is timed running a whole GEMM alone
      (``smooth_gemm.single_tile_plan``) on every (model weight shape, M) problem; then the menu of
      at most ``--menu-size`` tiles sharing one BLOCK_K (the kernels' bit-exactness rule) that
      minimises the sum over problems of (best time within the menu / best time of any tile) is
      written. The run-time planner then combines menu tiles per M with its cost model.
    * Meta-Attention ``attention.kv_tile`` and the query-tile menu ``attention.q_tiles``, timed
      through the backend's ``attention`` op on a decode batch, a prefill chunk and a mixed batch
      (skipped with a note when the Triton backend or the attention kernel is not available).

Timers
    devices: their events (the platform's timer); interpret: wall clock of the Triton
    interpreter on tiny shapes (only meaningful as an end-to-end check of the pipeline: the
    interpreter's speed says nothing about hardware); ``--dry-run``: a deterministic fake timer
    (the roofline model of ``backends/roofline.py`` that the GEMM planner uses, with a hash-seeded
    +-3 % ripple) that runs nothing and needs no device or Triton, so CI can exercise the whole
    flow.

The written file's header fields (``device``, ``triton_version``, ``triton_package``,
``kernel_source_hash``, ``tuned_at``, ``tuner``) let the loader drop it once the kernels or Triton
change.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import hashlib
import itertools
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .. import envs
from ..backends.device import detect
from ..backends.platforms import PLATFORMS, get_platform
from ..backends.profile import Profile, installed_triton, kernel_source_hash, load_profile
from ..backends.roofline import attention_cost, peaks
from ..envs import tuned_profile_dir
from .bench.shapes import layer_shapes

# The tuning ranges are the platforms' (``backends/platforms/``): a platform with a Triton backend
# and tuning ranges is tunable. Default weight shapes (N, K) on devices are a Qwen3-0.6B-like
# layer's: qkv, o, gate_up, down.
_TUNED = {n: p for n, p in PLATFORMS.items() if p.runs_triton and p.tune_ms}
TUNABLE = tuple(_TUNED)
DEFAULT_ARCH = {n: p.default_arch for n, p in _TUNED.items()}
DEFAULT_SHAPES = {n: p.tune_gemm_shapes for n, p in _TUNED.items()}
DEFAULT_MS = {n: p.tune_ms for n, p in _TUNED.items()}
KV_TILES = {n: p.tune_kv_tiles for n, p in _TUNED.items()}
Q_MENUS = [[16, 32, 64, 128], [16, 64, 128], [32, 64, 128], [16, 32, 64], [16, 64]]


# -------------------------------------------------------------------------------------------------
# problems and candidates
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmProblem:
    M: int
    N: int
    K: int

    @property
    def key(self) -> str:
        return f"{self.M}x{self.N}x{self.K}"


def tile_key(t: dict) -> str:
    s = f"{t['BLOCK_M']}x{t['BLOCK_N']}x{t['BLOCK_K']}"
    opts = {k: v for k, v in t.items() if not k.startswith("BLOCK_")}
    return s + ("" if not opts else " " + ",".join(f"{k}={v}" for k, v in sorted(opts.items())))


def shapes_from_model(path: str) -> list[tuple[int, int]]:
    """Weight shapes (N, K) of one Llama-family layer from an HF ``config.json`` (file or dir)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    cfg = json.loads(p.read_text())
    h = int(cfg["hidden_size"])
    nh = int(cfg["num_attention_heads"])
    nkv = int(cfg.get("num_key_value_heads", nh))
    hd = int(cfg.get("head_dim") or h // nh)
    return layer_shapes(h, nh, nkv, hd, int(cfg["intermediate_size"]))


def candidate_tiles(backend: str, profile: Profile, arch: str | None) -> list[dict]:
    """The pool of tiles to time: per-backend ranges filtered by on-chip limits, plus the shipped
    menu (so the tuned menu can never be worse than the shipped one by the tuner's own measure)."""
    pool = get_platform(backend).candidate_gemm_tiles(profile, arch)
    seen = {tile_key(t) for t in pool}
    for t in profile.gemm.get("tiles", []):
        if tile_key(t) not in seen:
            pool.append(dict(t))
            seen.add(tile_key(t))
    return pool


# -------------------------------------------------------------------------------------------------
# timers
# -------------------------------------------------------------------------------------------------
def _ripple(*parts) -> float:
    """Deterministic +-3 % noise so the fake timer does not produce exact ties."""
    h = hashlib.sha256(repr(parts).encode()).digest()
    return 1.0 + (int.from_bytes(h[:4], "little") / 2**32 - 0.5) * 0.06


def fake_gemm_time(tile: dict, p: GemmProblem, profile: Profile) -> float:
    """The planner's roofline time (s) of a single-tile GEMM (waves of full tiles, padding
    computed), with the ripple."""
    from ..triton_kernels.gemm_plan import single_tile_plan

    return single_tile_plan(p.M, p.N, p.K, tile, profile).est_time_s * _ripple(tile_key(tile), p.key)


def fake_attention_time(kv_tile: int, q_tiles: list[int], case: dict, profile: Profile) -> float:
    """Roofline time (s) of a case with every stage padded to whole query tiles (the smallest menu
    tile holding its GQA rows) and whole KV tiles, plus a per-tile overhead, with the ripple."""
    t = 0.0
    device = peaks(profile)
    for q_len, ctx in zip(case["query_lens"], case["seq_lens"]):
        rows = q_len * case["group"]
        qt = min((q for q in q_tiles if q >= rows), default=max(q_tiles))
        n_q, n_kv = math.ceil(rows / qt), math.ceil(ctx / kv_tile)
        padded_q = n_q * qt // case["group"]
        flops, nbytes = attention_cost(
            [(padded_q, n_kv * kv_tile - padded_q)], case["num_heads"], case["num_kv_heads"], case["head_dim"]
        )
        t += device.time(flops, nbytes) + n_q * n_kv * case["num_kv_heads"] * 2e-8
    return (t + 5e-6) * _ripple(kv_tile, tuple(q_tiles), case["name"])


# -------------------------------------------------------------------------------------------------
# profiles
# -------------------------------------------------------------------------------------------------
def _enter_interpret_mode() -> None:
    """Triton decides interpret vs compile when a @jit function is created, including its own
    helpers (tl.cdiv & co.) created when ``triton`` is first imported: TRITON_INTERPRET=1 must be
    set before that. Set it if nothing imported triton yet, refuse otherwise."""
    if "triton" in sys.modules and not envs.triton_interpret():
        raise RuntimeError(
            "--backend interpret: triton was already imported without TRITON_INTERPRET=1 in this process; "
            "run `TRITON_INTERPRET=1 portable-xy kernels tune --backend interpret` (or a fresh process)"
        )
    envs.set_triton_interpret(True)


def _with(profile: Profile, **sections) -> Profile:
    data = copy.deepcopy(profile.data)
    for sec, val in sections.items():
        data[sec] = {**data.get(sec, {}), **val}
    return Profile(profile.vendor, profile.arch, data, list(profile.sources))


# -------------------------------------------------------------------------------------------------
# GEMM
# -------------------------------------------------------------------------------------------------
def time_gemm_tiles(
    backend: str, profile: Profile, tiles: list[dict], problems: list[GemmProblem], device, dtype, timer, log
) -> dict[str, dict[str, float]]:
    """``{tile key: {problem key: seconds}}``; a tile that fails (compile or launch) gets inf."""
    import torch

    from ..triton_kernels import smooth_gemm as sg
    from ..triton_kernels.gemm_plan import single_tile_plan

    out: dict[str, dict[str, float]] = {}
    weights = {}
    for p in problems:
        if (p.N, p.K) not in weights:
            weights[(p.N, p.K)] = torch.randn(p.N, p.K, device=device, dtype=torch.float32).to(dtype) * 0.05
    xs = {p.key: torch.randn(p.M, p.K, device=device, dtype=torch.float32).to(dtype) for p in problems}
    for i, t in enumerate(tiles):
        res = {}
        prof = _with(profile, gemm={"tiles": [t]})
        for p in problems:
            try:
                plan = single_tile_plan(p.M, p.N, p.K, t, prof)
                x, w = xs[p.key], weights[(p.N, p.K)]
                res[p.key] = timer(lambda x=x, w=w, plan=plan, prof=prof: sg.smooth_gemm(x, w, None, prof, plan))
            except Exception as e:  # noqa: BLE001 - an unusable tile is simply not chosen
                log(f"  tile {tile_key(t)} failed on {p.key}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                res[p.key] = math.inf
        out[tile_key(t)] = res
        log(f"  [{i + 1}/{len(tiles)}] {tile_key(t)}: " + " ".join(f"{v * 1e6:.1f}" for v in res.values()) + " us")
    return out


def aot_filter(tiles: list[dict], profile: Profile, arch: str | None, log) -> list[dict]:
    """Drop CUDA candidates whose compiled SmoothGEMM (fp16) spills registers, overflows shared
    memory or misses tensor cores, by the AOT report (compiles for the arch, no GPU needed)."""
    from . import aot, aot_specs

    try:
        aot_arch = aot.normalize_arch(arch or "")
    except ValueError:
        log(f"aot check: no AOT limits for arch {arch!r}; candidates kept")
        return tiles
    aot.check_compiled_mode()
    kept = []
    for t in tiles:
        specs = [x for x in aot_specs.smooth_gemm(_with(profile, gemm={"tiles": [t]})) if "fp16" in x["name"]] or None
        if not specs:
            kept.append(t)
            continue
        rep = aot.compile_spec(specs[0], aot_arch, "smooth_gemm")
        if rep.ok:
            kept.append(t)
        else:
            log(f"  aot check drops {tile_key(t)}: {'; '.join(rep.problems)}")
    return kept


def choose_menu(
    tiles: list[dict], times: dict[str, dict[str, float]], menu_size: int, max_subsets: int = 50000
) -> tuple[list[dict], float]:
    """Best menu (<= menu_size tiles, one BLOCK_K) by sum over problems of the menu's best time
    relative to the best time of any tile. Returns ``(menu sorted by BLOCK_M, score)``; a score of
    ``len(problems)`` means every problem runs on its best tile."""
    probs = sorted({p for v in times.values() for p in v})
    best = {p: min(times[tile_key(t)][p] for t in tiles) for p in probs}

    def score(menu):
        s = 0.0
        for p in probs:
            m = min(times[tile_key(t)][p] for t in menu)
            s += m / best[p] if math.isfinite(m) and best[p] > 0 else 1e9
        return s

    winner, winner_score = None, math.inf
    for bk in sorted({t["BLOCK_K"] for t in tiles}):
        group = [t for t in tiles if t["BLOCK_K"] == bk and any(math.isfinite(v) for v in times[tile_key(t)].values())]
        for k in range(1, min(menu_size, len(group)) + 1):
            if math.comb(len(group), k) <= max_subsets:
                subsets = itertools.combinations(group, k)
            else:  # greedy forward selection
                menu: list[dict] = []
                for _ in range(k):
                    menu.append(min((t for t in group if t not in menu), key=lambda t: score(menu + [t])))
                subsets = [tuple(menu)]
            for menu in subsets:
                sc = score(menu)
                # fewer tiles win ties (within 0.1 %)
                if sc < winner_score * 0.999:
                    winner, winner_score = list(menu), sc
    if winner is None:
        raise RuntimeError("no candidate tile ran successfully")
    return sorted(winner, key=lambda t: (t["BLOCK_M"], t["BLOCK_N"])), winner_score


# -------------------------------------------------------------------------------------------------
# attention
# -------------------------------------------------------------------------------------------------
def attention_cases(backend: str) -> list[dict]:
    if get_platform(backend).triton_interpreted:
        heads = dict(num_heads=4, num_kv_heads=2, head_dim=32, group=2)
        return [
            dict(name="decode", query_lens=[1, 1], seq_lens=[40, 23], **heads),
            dict(name="prefill", query_lens=[24], seq_lens=[24], **heads),
        ]
    heads = dict(num_heads=16, num_kv_heads=8, head_dim=128, group=2)
    return [
        dict(name="decode", query_lens=[1] * 32, seq_lens=[1024] * 32, **heads),
        dict(name="prefill", query_lens=[512], seq_lens=[1024], **heads),
        dict(name="mixed", query_lens=[256] + [1] * 16 + [4] * 4, seq_lens=[512] + [2048] * 16 + [700] * 4, **heads),
    ]


def _attention_inputs(case: dict, block_size: int, device, dtype):
    import torch

    from ..backends.base import AttnMetadata

    ql, sl = case["query_lens"], case["seq_lens"]
    nh, nkv, d = case["num_heads"], case["num_kv_heads"], case["head_dim"]
    nblk = [math.ceil(s / block_size) for s in sl]
    total_blocks = sum(nblk) + 1
    max_blocks = max(nblk)
    tables = torch.zeros(len(sl), max_blocks, dtype=torch.int32)
    nxt, slots, pos = 1, [], []
    for i, (q, s) in enumerate(zip(ql, sl)):
        ids = list(range(nxt, nxt + nblk[i]))
        nxt += nblk[i]
        tables[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        for j in range(s - q, s):
            slots.append(ids[j // block_size] * block_size + j % block_size)
            pos.append(j)
    qsl = torch.tensor([0, *itertools.accumulate(ql)], dtype=torch.int32)
    meta = AttnMetadata(
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor(sl, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        positions=torch.tensor(pos, dtype=torch.int64, device=device),
        query_lens_cpu=list(ql),
        seq_lens_cpu=list(sl),
    )
    t = sum(ql)
    q = torch.randn(t, nh, d, device=device, dtype=torch.float32).to(dtype)
    kc = torch.randn(total_blocks, block_size, nkv, d, device=device, dtype=torch.float32).to(dtype)
    vc = torch.randn_like(kc)
    return q, kc, vc, meta


def _backend_with_profile(base, profile: Profile):
    try:
        return type(base)(base.device, profile)
    except TypeError:
        b = copy.copy(base)
        b.profile = profile
        return b


def time_attention(
    backend: str, profile: Profile, device, dtype, timer, log, dry_run: bool
) -> tuple[dict[str, Any] | None, dict]:
    """Best ``{kv_tile, q_tiles}`` and the timings, or ``(None, info)`` when not tunable here."""
    cases = attention_cases(backend)
    combos = [(kv, q) for kv in KV_TILES[backend] for q in Q_MENUS]
    cur = profile.attention
    if (cur.get("kv_tile"), list(cur.get("q_tiles", []))) not in combos:
        combos.append((int(cur.get("kv_tile", 32)), list(cur.get("q_tiles", [16, 32, 64, 128]))))
    results: dict[str, dict[str, float]] = {}
    if dry_run:
        for kv, qm in combos:
            results[f"kv{kv} q{qm}"] = {c["name"]: fake_attention_time(kv, qm, c, profile) for c in cases}
    else:
        try:
            from ..backends import get_backend

            base = get_backend(backend)
        except Exception as e:  # noqa: BLE001 - no Triton backend yet / no attention kernel
            return None, {"skipped": f"attention not tuned: backend unavailable ({type(e).__name__}: {e})"}
        inputs = {c["name"]: _attention_inputs(c, profile.kv_block_size, device, dtype) for c in cases}
        for kv, qm in combos:
            bk = _backend_with_profile(base, _with(profile, attention={"kv_tile": kv, "q_tiles": qm}))
            res = {}
            for c in cases:
                q, kc, vc, meta = inputs[c["name"]]
                try:
                    meta.plan = None
                    bk.prepare(meta, c["num_heads"], c["num_kv_heads"], c["head_dim"])
                    scale = c["head_dim"] ** -0.5
                    res[c["name"]] = timer(
                        lambda bk=bk, q=q, kc=kc, vc=vc, meta=meta, s=scale: bk.attention(q, kc, vc, meta, s)
                    )
                except ImportError as e:  # e.g. the Meta-Attention module is not there yet
                    return None, {"skipped": f"attention not tuned: {type(e).__name__}: {e}"}
                except NotImplementedError as e:
                    return None, {
                        "skipped": f"attention not tuned: {type(base).__name__}.attention not implemented ({e})"
                    }
                except Exception as e:  # noqa: BLE001
                    log(f"  attention kv{kv} q{qm} failed on {c['name']}: {type(e).__name__}: {str(e)[:120]}")
                    res[c["name"]] = math.inf
            results[f"kv{kv} q{qm}"] = res
            log(f"  kv_tile={kv} q_tiles={qm}: " + " ".join(f"{v * 1e6:.1f}" for v in res.values()) + " us")
    best_case = {c["name"]: min(r[c["name"]] for r in results.values()) for c in cases}

    def score(key):
        return sum(results[key][n] / best_case[n] if best_case[n] > 0 else 1e9 for n in best_case)

    keys = [f"kv{kv} q{qm}" for kv, qm in combos]
    best_key = min(keys, key=score)
    kv, qm = combos[keys.index(best_key)]
    if not math.isfinite(score(best_key)):
        return None, {"skipped": "attention not tuned: every candidate failed"}
    return {"kv_tile": kv, "q_tiles": qm}, {"score": round(score(best_key), 4), "cases": [c["name"] for c in cases]}


# -------------------------------------------------------------------------------------------------
# driver
# -------------------------------------------------------------------------------------------------
def tune(
    backend: str,
    dry_run: bool = False,
    out: str | os.PathLike | None = None,
    arch: str | None = None,
    shapes: list[tuple[int, int]] | None = None,
    m_values: list[int] | None = None,
    menu_size: int | None = None,
    attention: bool = True,
    warmup: int | None = None,
    reps: int | None = None,
    device_name: str | None = None,
    aot_check: bool | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Run the tuner; returns the path of the written profile file."""
    if backend not in TUNABLE:
        raise ValueError(f"--backend must be one of {sorted(TUNABLE)}")
    platform = get_platform(backend)
    vendor = platform.vendor
    dev = None
    cores = None
    if dry_run:
        arch = arch or DEFAULT_ARCH[backend]
        name = device_name or f"dry-run ({vendor} {arch or 'generic'})"
    else:
        try:
            info = detect(backend)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; use --dry-run (fake timer) or --backend interpret") from None
        dev, cores = info.device, info.num_cores
        arch = arch or info.arch
        name = device_name or info.name
        if platform.triton_interpreted:
            _enter_interpret_mode()
    profile = load_profile(vendor, arch, tuned=False)  # the repo's files, not an earlier tuning
    if cores and profile.data.get("num_cores_from") == platform.core_source:
        profile = profile.with_num_cores(cores)
    shapes = shapes or DEFAULT_SHAPES[backend]
    m_values = m_values or DEFAULT_MS[backend]
    problems = [GemmProblem(m, n, k) for (n, k) in shapes for m in m_values]
    menu_size = menu_size or max(1, len(profile.gemm.get("tiles", [])))
    tiles = candidate_tiles(backend, profile, arch)
    warmup = warmup if warmup is not None else (1 if platform.triton_interpreted else 10)
    reps = reps if reps is not None else (2 if platform.triton_interpreted else 50)
    log(
        f"tuning {backend} ({name}, arch={arch or '-'}, {profile.num_cores} cores): {len(tiles)} GEMM tiles x "
        f"{len(problems)} problems" + (" [dry-run: fake timer]" if dry_run else "")
    )
    if aot_check is None:
        aot_check = bool(platform.aot_archs) and not dry_run
    if aot_check:
        if not platform.aot_archs:
            aot_backends = sorted(n for n, p in _TUNED.items() if p.aot_archs)
            raise RuntimeError(f"--aot-check applies to --backend {' / '.join(aot_backends)} only")
        n0 = len(tiles)
        tiles = aot_filter(tiles, profile, arch, log)
        log(f"aot check: {len(tiles)}/{n0} candidate tiles compile without spills within shared memory")
    dtype = None
    timer = None
    if not dry_run:
        import torch

        dtype = torch.float32 if platform.triton_interpreted else torch.float16
        timer = platform.make_timer(warmup, reps)
        times = time_gemm_tiles(backend, profile, tiles, problems, dev, dtype, timer, log)
    else:
        times = {tile_key(t): {p.key: fake_gemm_time(t, p, profile) for p in problems} for t in tiles}
    menu, score = choose_menu(tiles, times, menu_size)
    shipped = [t for t in tiles if tile_key(t) in {tile_key(s) for s in profile.gemm.get("tiles", [])}]
    shipped_score = _menu_score(shipped, times)
    log(
        f"GEMM menu: {[tile_key(t) for t in menu]} (score {score:.3f}; shipped menu {shipped_score:.3f}; "
        f"{len(problems)} = every problem on its best tile)"
    )
    data: dict[str, Any] = {"gemm": {"tiles": menu}}
    att_info: dict = {}
    if attention:
        att, att_info = time_attention(backend, profile, dev, dtype, timer, log, dry_run)
        if att is None:
            log(att_info.get("skipped", "attention not tuned"))
        else:
            data["attention"] = att
            log(f"attention: kv_tile={att['kv_tile']} q_tiles={att['q_tiles']}")
    pkg, ver = installed_triton()
    header = {
        "device": name,
        "triton_version": ver,
        "triton_package": pkg,
        "kernel_source_hash": kernel_source_hash(),
        "tuned_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tuner": {
            "backend": backend,
            "arch": arch,
            "timer": "fake (dry-run)" if dry_run else (platform.event_timer or "wall clock"),
            "gemm_shapes_NK": [list(s) for s in shapes],
            "m_values": list(m_values),
            "gemm_candidates": len(tiles),
            "aot_checked": bool(aot_check),
            "gemm_menu_score": round(score, 4),
            "shipped_menu_score": round(shipped_score, 4),
            **({"attention": att_info} if att_info else {}),
        },
    }
    path = Path(out) if out else tuned_profile_dir() / vendor / f"{arch or 'default'}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        f"# Tuned profile written by `portable-xy kernels tune --backend {backend}`"
        f"{' --dry-run' if dry_run else ''}.\n"
        "# Layered over the shipped profiles; ignored once kernel_source_hash or triton_version change.\n"
        + yaml.safe_dump(header, sort_keys=False, default_flow_style=None)
        + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    )
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    log(f"wrote {path}")
    return path


def _menu_score(menu: list[dict], times) -> float:
    if not menu:
        return math.nan
    probs = sorted({p for v in times.values() for p in v})
    best = {p: min(v[p] for v in times.values()) for p in probs}
    return sum(min(times[tile_key(t)][p] for t in menu) / best[p] for p in probs)


def _parse_shapes(s: str) -> list[tuple[int, int]]:
    out = []
    for part in s.split(","):
        n, k = part.lower().split("x")
        out.append((int(n), int(k)))
    return out


def _run_cli(args: argparse.Namespace) -> int:
    shapes = None
    if args.model:
        shapes = shapes_from_model(args.model)
    if args.shapes:
        shapes = _parse_shapes(args.shapes)
    m_values = [int(m) for m in args.m_values.split(",")] if args.m_values else None
    try:
        tune(
            args.backend,
            dry_run=args.dry_run,
            out=args.out,
            arch=args.arch,
            shapes=shapes,
            m_values=m_values,
            menu_size=args.menu_size,
            attention=not args.no_attention,
            warmup=args.warmup,
            reps=args.reps,
            device_name=args.device_name,
            aot_check=args.aot_check,
        )
    except RuntimeError as e:
        print(f"tune: {e}", file=sys.stderr)
        return 2
    return 0


def add_tune_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune",
        help="offline tile tuner: time candidate GEMM/attention tiles, write a tuned profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backend", required=True, choices=sorted(TUNABLE))
    p.add_argument("--dry-run", action="store_true", help="deterministic fake timer; runs no kernel, needs no device")
    p.add_argument("--out", help="write here instead of tuned_profile_dir()/<vendor>/<arch>.yaml")
    p.add_argument("--arch", help="profile arch (sm80, sm90, 910b, ...); default: detected (dry-run: sm80 / 910b)")
    p.add_argument("--model", help="HF model dir or config.json: tune on its layer's weight shapes")
    p.add_argument("--shapes", help="GEMM weight shapes NxK,NxK,... (overrides --model)")
    p.add_argument("--m-values", help="token counts M to time, e.g. 1,16,256 (default per backend)")
    p.add_argument("--menu-size", type=int, help="max tiles in the menu (default: the shipped menu's size)")
    p.add_argument("--no-attention", action="store_true", help="tune the GEMM menu only")
    p.add_argument("--warmup", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--device-name", help="override the device name written to the header")
    p.add_argument(
        "--aot-check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cuda: first drop candidates whose AOT compile spills / overflows smem (default: on unless --dry-run)",
    )
    p.set_defaults(func=_run_cli)
    return p
