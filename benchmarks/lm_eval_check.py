"""lm-eval-harness against `tpserve serve`, unchanged, on two small tasks shipped in the repo
(benchmarks/lm_eval: a multiple-choice loglikelihood task and a generate-until task), and its
loglikelihoods checked against transformers' log-softmax on the same tokens.

    make bench-clients     # builds .venv-clients (lm-eval 0.4.13), then runs this

lm-eval's `local-completions` sends each (context, choice) as a token-id prompt with `echo`,
`logprobs: 1` and `max_tokens: 1`, and sums the choice tokens' prompt logprobs; this script
recomputes every such sum with transformers (the same tokenization, lm-eval's `_encode_pair`
split) and prints the largest difference, beside each task's metric. The generate-until task runs
twice: through `local-completions` and through `local-chat-completions` (the chat template
applied, as lm-eval's users run chat models); the first answers of each are printed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from workers import set_openmp_env

set_openmp_env()

from cluster.bench.local_server import running_server  # noqa: E402
from workers.model_source import resolve_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LM_EVAL = ROOT / ".venv-clients" / "bin" / "lm_eval"


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces move from the context to the continuation; the
    continuation's tokens are the whole string's past the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def lm_eval(args: list[str], out: Path) -> dict:
    """One `lm_eval run` on the repo's tasks: {"table": its result lines, "samples": task -> logged samples}."""
    cmd = [str(LM_EVAL), "run", *args, "--include_path", str(ROOT / "benchmarks" / "lm_eval"),
           "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "none"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise SystemExit(f"lm_eval failed ({run.returncode}):\n{run.stderr[-4000:]}")
    samples = {}
    for path in glob.glob(f"{out}/**/samples_*.jsonl", recursive=True):
        task = Path(path).name.split("_", 1)[1].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in open(path)]
    return {"table": [line for line in run.stdout.splitlines() if line.startswith("|")], "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args()
    if not LM_EVAL.exists():
        raise SystemExit(f"{LM_EVAL} is missing: run `make bench-clients`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(resolve_model(args.model))
    tok = AutoTokenizer.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as tmp, running_server("--model", args.model, "--tp", str(args.tp)) as srv:
        completions = lm_eval(["--model", "local-completions", "--model_args",
                               f"model={args.model},base_url=http://{srv.http_target}/v1/completions,"
                               f"tokenizer={folder},tokenizer_backend=huggingface,tokenized_requests=True,"
                               "num_concurrent=4,max_retries=1", "--tasks", "tpserve_mc,tpserve_gen"], Path(tmp) / "c")
        chat = lm_eval(["--model", "local-chat-completions", "--model_args",
                        f"model={args.model},base_url=http://{srv.http_target}/v1/chat/completions,"
                        "num_concurrent=4,max_retries=1", "--apply_chat_template", "--tasks", "tpserve_gen"],
                       Path(tmp) / "chat")
    samples = completions["samples"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    diffs = []
    for s in samples.get("tpserve_mc", []):
        # one (context, continuation) per choice: {"gen_args_0": {"arg_0", "arg_1"}, ...} or pairs
        args_list = list(s["arguments"].values()) if isinstance(s["arguments"], dict) else s["arguments"]
        for pair, resp in zip(args_list, s["resps"]):
            context, continuation = (pair["arg_0"], pair["arg_1"]) if isinstance(pair, dict) else pair
            ctx, cont = encode_pair(tok, context, continuation)
            with torch.no_grad():
                lp = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
            ref = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
            diffs.append(abs(ref - float(resp[0][0])))
    for name, run in (("local-completions", completions), ("local-chat-completions", chat)):
        print(f"lm-eval {name}:")
        print("\n".join(run["table"]))
        for sample in run["samples"].get("tpserve_gen", [])[:3]:
            print(f"  {sample['target']!r} -> {sample['filtered_resps'][0]!r}")
    print(f"\nloglikelihoods checked: {len(diffs)}; largest |tpserve - transformers| = "
          f"{max(diffs) if diffs else float('nan'):.2e} (target <= 1e-3)")
    if not diffs:
        sys.exit("no loglikelihood samples were found")


if __name__ == "__main__":
    main()
