"""Generate with the default model (SmolLM2-135M-Instruct, CPU unless a GPU/NPU is found) and
print each completion with the measured output tokens/s.

    python examples/generate.py [--model PATH] [--backend cpu] [--dtype auto] [--max-tokens 64]
"""

import sys

from portable_xy.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
