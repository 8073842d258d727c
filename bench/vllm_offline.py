"""``python -m bench.vllm_offline MODEL_DIR PROMPTS_JSON MAX_TOKENS``: vLLM's own greedy ids.

The reference side of the vLLM pair's parity check (``bench.vllm_probes.parity``): runs
vLLM's offline ``LLM.generate`` on the token-id prompts of ``PROMPTS_JSON`` (a JSON list of
lists of ints) with the engine settings both served targets use (``--enforce-eager``,
``--max-model-len 512``, ``--dtype float32``), temperature 0 and ``ignore_eos``, and prints
one JSON line: the generated token ids per prompt. It runs under a python with vLLM (the
(e) side's venv), started by ``bench.vllm_pair``; vLLM spawns its engine core, hence the
``__main__`` guard.
"""

from __future__ import annotations

import json
import sys

MAX_MODEL_LEN = 512


def generate(model_dir: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, enforce_eager=True, max_model_len=MAX_MODEL_LEN, dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def main(argv: list[str]) -> int:
    model_dir, prompts_path, max_tokens = argv
    with open(prompts_path, encoding="utf-8") as f:
        prompts = json.load(f)
    print("OFFLINE " + json.dumps(generate(model_dir, prompts, int(max_tokens))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
