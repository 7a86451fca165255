"""portable_xy's GGUF reader against the `gguf` package's reader, and the GGUF tokenizer cache."""

import numpy as np
import pytest

from portable_xy.models.gguf_file import GGUFFile


def reference(path):
    """Fields and tensors as ``gguf.GGUFReader`` reads them."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return r, fields


def assert_same_as_reference(path):
    ours = GGUFFile(path)
    r, fields = reference(path)
    assert ours.fields.keys() == fields.keys()
    for key, want in fields.items():
        got = ours.fields[key]
        if isinstance(got, np.ndarray):
            assert got.tolist() == want, key
        else:
            assert got == want and type(got) is type(want), key
    assert [t.name for t in ours.tensors] == [t.name for t in r.tensors]
    for a, b in zip(ours.tensors, r.tensors):
        assert a.ggml_type == int(b.tensor_type)
        assert a.shape == tuple(int(n) for n in reversed(b.shape))
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data, equal_nan=True), a.name


def test_reader_matches_gguf_package_on_smollm2(smollm2_path):
    assert_same_as_reference(smollm2_path)


def write_synthetic(path):
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    g = np.random.default_rng(0)
    w = GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -5)
    w.add_uint64("t.u64", 2**60)
    w.add_int64("t.i64", -(2**40))
    w.add_float32("t.f32", 0.25)
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁world")
    w.add_array("t.ints", [3, 1, 4, 1, 5])
    w.add_array("t.floats", [0.5, -1.5])
    w.add_array("t.strs", ["a", "", "ü" * 300])
    w.add_tensor("f32", g.standard_normal((3, 17)).astype(np.float32))
    w.add_tensor("f16", g.standard_normal((5, 64)).astype(np.float16))
    q = quantize(g.standard_normal((4, 96)).astype(np.float32), GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_reader_matches_gguf_package_on_every_value_type(tmp_path):
    path = tmp_path / "synthetic.gguf"
    write_synthetic(path)
    assert_same_as_reference(path)


def test_every_truncation_and_garbage_raise_value_error(tmp_path):
    """Cut after every byte (header, each value type, the string array, tensor infos, data): always
    a ValueError naming the problem, never another exception or a short read."""
    path = tmp_path / "synthetic.gguf"
    write_synthetic(path)
    data = path.read_bytes()
    end = max(t.data_offset + t.n_bytes for t in reference(path)[0].tensors)  # then alignment padding
    cut = tmp_path / "cut.gguf"
    for keep in range(end):
        cut.write_bytes(data[:keep])
        with pytest.raises(ValueError, match="truncated|bad magic|empty|past the end"):
            GGUFFile(cut)
    rng = np.random.default_rng(1)
    for _ in range(50):  # a valid start, then noise: never anything but ValueError (or success)
        junk = bytearray(data)
        junk[24 + rng.integers(len(data) - 24)] ^= 0xFF
        cut.write_bytes(bytes(junk))
        try:
            GGUFFile(cut)
        except ValueError:
            pass


def test_gguf_tokenizer_is_cached_and_identical(smollm2_path, tmp_path, monkeypatch):
    """The first load builds the tokenizer from the GGUF and saves it; the second reads the saved
    copy (no GGUF parse); both encode, decode and apply the chat template as transformers' own
    GGUF tokenizer does. A damaged cache is rebuilt."""
    import transformers

    from portable_xy.models import loader

    monkeypatch.setenv("PORTABLE_XY_CACHE", str(tmp_path))
    direct = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    calls = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    first = loader.load_gguf_tokenizer(smollm2_path)
    second = loader.load_gguf_tokenizer(smollm2_path)
    assert calls == [smollm2_path.name, None]  # built from the GGUF once, then from the cache
    texts = ["Hello, world!", "  spaces\tand\nnewlines ", "naïve café 東京 🙂", "<|im_start|>user\nhi<|im_end|>"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    for tok in (first, second):
        for t in texts:
            assert tok(t).input_ids == direct(t).input_ids
            assert tok.decode(direct(t).input_ids) == direct.decode(direct(t).input_ids)
        assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == direct.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )
        assert (tok.eos_token_id, tok.bos_token_id, len(tok)) == (direct.eos_token_id, direct.bos_token_id, len(direct))
    (cached,) = (tmp_path / "tokenizers").iterdir()
    (cached / "tokenizer.json").write_text("{ not json")
    calls.clear()
    again = loader.load_gguf_tokenizer(smollm2_path)
    assert calls == [None, smollm2_path.name]  # the damaged copy failed, the GGUF was read again
    assert again(texts[2]).input_ids == direct(texts[2]).input_ids
    assert loader.load_gguf_tokenizer(smollm2_path)(texts[0]).input_ids == direct(texts[0]).input_ids
