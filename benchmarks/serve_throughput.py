"""Serving throughput: aggregate generated tokens/s and p50 / p99 request latency at 1, 4, 16 and 64 concurrent
streams, TiDAR and AR mode of `tidar-megatron serve`, on the same checkpoint in one run; optionally against
another revision's server (before / after), and the engine's overhead over the bare `Decoder`.

    python benchmarks/serve_throughput.py                                  # the toy model below, this tree
    python benchmarks/serve_throughput.py --baseline main                  # ... and main's server, interleaved
    python benchmarks/serve_throughput.py --baseline main --temperature 0.8  # sampled requests (seed i)
    python benchmarks/serve_throughput.py --baseline main --block-by-load 16:4  # this TiDAR server's option
    python benchmarks/serve_throughput.py --model <hf dir> --prompts prompts.txt --device cuda --baseline HEAD~3
    python benchmarks/serve_throughput.py --levels 1 4 --requests 4 --max-tokens 16 --train-steps 20  # quick
    python benchmarks/serve_throughput.py --client openai                  # the real openai client per stream

Every server runs in a subprocess of its own (`tidar-megatron serve`'s main), the baseline's from a copy of
that revision (`git archive`) first on its PYTHONPATH.  Each level sends max(--requests, streams) streaming
completions (greedy, --max-tokens each), that many at once, on loopback: by default from one light asyncio
client (httpx, only each stream's last chunk parsed), so that on a small machine the clients do not take the
server's CPU; `--client openai` uses the real `openai` client, one per stream in a thread of its own.  The
servers' --max-batch is the largest level.  Levels run in order, and within a level
each server (this tree and the baseline, TiDAR and AR) in turn, so that a drift of the machine hits all alike;
--repeats N runs that round N times and reports each server's median run (the lower one for an even N; a
2-core VM drifts by 30% and more) with the errors of all runs.

Engine overhead: the same --overhead-batch prompts decoded by `Decoder.generate` as one batch and by the
serving engine (no HTTP: `Engine.step` on one thread, max_batch = the batch, with the model's tokenizer when it
has one), each in a subprocess for this tree and the baseline; the ratio is the Decoder's tokens/s over the engine's (1.0 = no overhead).
Without --model the script trains the decoder's toy model on a repetitive corpus (tidar_megatron.testing),
so that drafts are accepted.  Timings belong here, not in the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import io
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SERVER = ("import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
          "from tidar_megatron.serving.server import main; sys.exit(main(sys.argv[2:]))")


def toy_checkpoint(path: Path, block: int, steps: int) -> list[list[int]]:
    """A trained toy checkpoint in `path`; returns prompts (token ids) from its corpus."""
    from tidar_megatron.testing import repetitive_corpus, trained_toy_checkpoint

    corpus = repetitive_corpus(1024, 65, list(range(3, 131)), num_cycles=4, seed=0)
    trained_toy_checkpoint(path, corpus, steps, vocab_size=256, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=4, tidar_mask_token_id=255, tidar_draft_block_size=block,
                           eos_token_id=None, max_position_embeddings=512)
    return [corpus[i, :16].tolist() for i in range(64)]


def checkout(rev: str, into: Path) -> Path:
    """The tree of git revision `rev` extracted into `into` (no worktree registered)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def environment(tree: Path | None) -> dict:
    env = dict(os.environ)
    if tree is not None:  # the revision's package first on the path, ahead of this tree's editable install
        env["PYTHONPATH"] = os.pathsep.join([str(tree)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def imported_from(tree: Path | None) -> str:
    """Where a subprocess with `environment(tree)` imports tidar_megatron from (a check on the baseline)."""
    code = "import tidar_megatron.serving.engine as e; print(e.__file__)"
    return subprocess.run([sys.executable, "-c", code], env=environment(tree), cwd=tempfile.gettempdir(),
                          capture_output=True, text=True, check=True).stdout.strip()


class ServerProcess:
    """`tidar-megatron serve` in a subprocess, importing tidar_megatron from `tree` (None: this install)."""

    def __init__(self, tree: Path | None, model_dir: Path, mode: str, max_batch: int, device: str, threads: int,
                 extra: list[str] = ()):
        from tidar_megatron.net import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["--model", str(model_dir), "--port", str(self.port), "--mode", mode, "--max-batch", str(max_batch),
                "--max-model-len", "512", "--device", device, *extra]
        # cwd: not this repository, whose tidar_megatron a `-c` script would import first
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, str(threads), *args], env=environment(tree),
                                        cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 300):
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server on {self.url} exited: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server on {self.url} did not start in {timeout} s")

    def close(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def run_level(url: str, prompts, streams: int, requests: int, max_tokens: int, temperature: float = 0.0,
              client: str = "httpx", seeded: bool = True) -> dict:
    """`requests` streaming completions, `streams` at a time; aggregate tokens/s and latency percentiles.

    client "httpx": one asyncio loop with one connection pool, each stream's lines read as they come and only
    its last chunk parsed (the usage, or the error) -- about as light as a client gets in Python, so that on
    a small machine the figure is the server's and not the clients'.  "openai": the real `openai` client in
    a thread per stream (a new client per request, every chunk parsed into its models), as an application
    would use it; on a 2-core machine its parsing takes about as much CPU as the server.  `seeded`: request i
    sends seed i (a seeded sampled request decodes with the checkpoint's block under any --block-by-load).
    """
    todo = list(range(requests))
    latencies, tokens, errors = [], [0], []

    def finished(start: float, n: int):
        latencies.append(time.perf_counter() - start)
        tokens[0] += n

    start = time.perf_counter()
    if client == "openai":
        _openai_clients(url, prompts, streams, max_tokens, temperature, seeded, todo, finished, errors)
    else:
        asyncio.run(_httpx_clients(url, prompts, streams, max_tokens, temperature, seeded, todo, finished, errors))
    wall = time.perf_counter() - start
    latencies.sort() if latencies else latencies.append(float("nan"))
    return {"streams": streams, "requests": requests, "client": client, "errors": len(errors),
            "first_error": errors[:1], "tokens": tokens[0], "seconds": wall, "tokens_per_s": tokens[0] / wall,
            "latency_p50_s": statistics.median(latencies),
            "latency_p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]}


async def _httpx_clients(url, prompts, streams, max_tokens, temperature, seeded, todo, finished, errors):
    import httpx

    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as http:
        async def one_stream():
            while todo:  # one event loop: no lock needed
                i = todo.pop()
                start, last = time.perf_counter(), None
                body = {"model": "m", "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                        "temperature": temperature, "stream": True, **({"seed": i} if seeded else {})}
                try:
                    async with http.stream("POST", "/v1/completions", json=body) as response:
                        if response.status_code != 200:
                            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                        async for line in response.aiter_lines():
                            if line.startswith("data: {"):
                                last = line
                    chunk = json.loads(last[len("data: "):])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    finished(start, chunk["usage"]["completion_tokens"])
                except Exception as e:  # counted and reported, the level goes on
                    errors.append(f"{type(e).__name__}: {e}")

        await asyncio.gather(*(one_stream() for _ in range(streams)))


def _openai_clients(url, prompts, streams, max_tokens, temperature, seeded, todo, finished, errors):
    import openai

    lock = threading.Lock()

    def one_stream():
        api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            start, n = time.perf_counter(), 0
            try:
                stream = api.completions.create(model="m", prompt=prompts[i % len(prompts)], max_tokens=max_tokens,
                                                temperature=temperature, seed=i if seeded else None,
                                                stream=True)
                for chunk in stream:
                    if chunk.usage is not None:
                        n = chunk.usage.completion_tokens
            except Exception as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                finished(start, n)

    threads = [threading.Thread(target=one_stream) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# --- the engine against the bare Decoder (run in a subprocess per tree: `--overhead-only`) -----------------
def measure_overhead(model_dir: Path, prompts, batch: int, max_tokens: int, mode: str, device: str,
                     repeats: int) -> dict:
    from tidar_megatron.errors import TiDARError
    from tidar_megatron.inference.decoding import Decoder
    from tidar_megatron.inference.generate import load_tokenizer
    from tidar_megatron.serving.engine import Engine, Request

    prompts = [prompts[i % len(prompts)] for i in range(batch)]
    decoder = Decoder.from_pretrained(model_dir, device=device)
    try:  # the engine's text (detokenization) is part of its overhead
        tokenizer = load_tokenizer(model_dir)
    except TiDARError:
        tokenizer = None  # the toy model has none
    engine_s, decoder_s, engine_tokens, decoder_tokens = [], [], 0, 0
    for _ in range(repeats):  # alternated, best of `repeats` each
        start = time.perf_counter()
        out = decoder.generate(prompts, max_tokens, mode=mode)
        decoder_s.append(time.perf_counter() - start)
        decoder_tokens = sum(map(len, out.tokens))
        engine = Engine(decoder, tokenizer, mode, max_batch=batch, max_model_len=512)
        done = []
        requests = [Request(list(p), max_tokens, on_event=lambda e, d=done: d.append(e)) for p in prompts]
        start = time.perf_counter()
        for r in requests:
            engine.submit(r)
        with torch.inference_mode():
            while sum(e.finish_reason is not None for e in done) < batch:
                engine.step()
        engine_s.append(time.perf_counter() - start)
        engine_tokens = sum(len(e.tokens) for e in done)
    decoder_tps, engine_tps = decoder_tokens / min(decoder_s), engine_tokens / min(engine_s)
    return {"mode": mode, "batch": batch, "decoder_tokens_per_s": decoder_tps, "engine_tokens_per_s": engine_tps,
            "decoder_over_engine": decoder_tps / engine_tps}


def overhead_in(tree: Path | None, args, model_dir: Path, prompts_file: Path, mode: str) -> dict:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    command = [sys.executable, str(Path(__file__).resolve()), "--overhead-only", "--model", str(model_dir),
               "--prompt-ids", str(prompts_file), "--overhead-mode", mode, "--overhead-batch",
               str(args.overhead_batch), "--max-tokens", str(args.max_tokens), "--device", args.device,
               "--threads", str(args.threads), "--json", str(out)]
    subprocess.run(command, env=environment(tree), check=True)
    return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="exported HF directory (default: a toy model trained here)")
    p.add_argument("--prompts", help="a text file, one prompt per line (with --model)")
    p.add_argument("--baseline", help="a git revision whose server runs the same levels (before / after)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--modes", nargs="+", default=["tidar", "ar"], choices=["tidar", "ar"])
    p.add_argument("--requests", type=int, default=16, help="requests per level (at least one per stream)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy requests; > 0: sampled, seed i")
    p.add_argument("--unseeded", action="store_true", help="send no seeds (seeded sampled requests keep the "
                   "checkpoint's draft block under --block-by-load, so a seeded sampled level measures `off`)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each level per server; the median is reported")
    p.add_argument("--client", choices=["httpx", "openai"], default="httpx",
                   help="httpx: one light asyncio client (the server's figure); openai: a client per stream")
    p.add_argument("--block-by-load", help="this tree's TiDAR server gets `serve --block-by-load` (e.g. 16:4)")
    p.add_argument("--block-size", type=int, default=8, help="the toy model's draft block")
    p.add_argument("--train-steps", type=int, default=300, help="the toy model's training steps")
    p.add_argument("--overhead-batch", type=int, default=16, help="engine vs Decoder batch (0: skip)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server / measurement")
    p.add_argument("--json")
    p.add_argument("--overhead-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overhead-mode", default="tidar", help=argparse.SUPPRESS)
    p.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.overhead_only:
        prompts = json.loads(Path(args.prompt_ids).read_text())
        result = measure_overhead(Path(args.model), prompts, args.overhead_batch, args.max_tokens,
                                  args.overhead_mode, args.device, repeats=3)
        Path(args.json).write_text(json.dumps(result))
        return 0

    work = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    if args.model:
        model_dir = Path(args.model)
        prompts = Path(args.prompts).read_text().splitlines() if args.prompts else ["def main():\n"]
    else:
        model_dir = work / "toy"
        prompts = toy_checkpoint(model_dir, args.block_size, args.train_steps)
    trees = {"this": None}
    if args.baseline:
        trees["baseline"] = checkout(args.baseline, work / "baseline")
    for tree, path in trees.items():
        print(f"{tree}: tidar_megatron from {imported_from(path)}")
    extra = {"this": ["--block-by-load", args.block_by_load] if args.block_by_load else []}
    servers = {(tree, mode): ServerProcess(path, model_dir, mode, max(args.levels), args.device, args.threads,
                                           extra.get(tree, []) if mode == "tidar" else [])
               for tree, path in trees.items() for mode in args.modes}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} torch thread(s)"
    revision = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    results = {"device": device, "model": str(model_dir), "revision": revision, "baseline": args.baseline,
               "max_tokens": args.max_tokens, "temperature": args.temperature, "client": args.client,
               "seeded": not args.unseeded, "repeats": args.repeats,
               "block_by_load": args.block_by_load,
               "levels": {}, "overhead": {}}
    print(f"device: {device}; model {model_dir}; this tree {revision}"
          + (f", baseline {args.baseline}" if args.baseline else "")
          + f"; {args.max_tokens} tokens per request, temperature {args.temperature}")
    print(f"{'streams':>7} {'server':>8} {'mode':>6} {'tok/s':>8} {'p50 s':>8} {'p99 s':>8} {'errors':>6}")
    try:
        for server in servers.values():
            server.wait_ready()
            run_level(server.url, prompts, 1, 2, args.max_tokens, client=args.client)  # warm-up, not counted
        for streams in args.levels:
            level = results["levels"].setdefault(str(streams), {})
            runs = {key: [] for key in servers}
            for _ in range(args.repeats):  # the servers in turn, again and again: drifts hit all alike
                for key, server in servers.items():
                    runs[key].append(run_level(server.url, prompts, streams, max(args.requests, streams),
                                               args.max_tokens, args.temperature, args.client, not args.unseeded))
            for (tree, mode), rows in runs.items():
                row = dict(sorted(rows, key=lambda r: r["tokens_per_s"])[(len(rows) - 1) // 2])  # the (lower) median
                row["tokens_per_s_runs"] = [r["tokens_per_s"] for r in rows]
                row["errors"] = sum(r["errors"] for r in rows)  # every run's, not only the median's
                row["first_error"] = [e for r in rows for e in r["first_error"]][:1]
                level[f"{tree}/{mode}"] = row
                print(f"{streams:>7} {tree:>8} {mode:>6} {row['tokens_per_s']:>8.1f} {row['latency_p50_s']:>8.2f} "
                      f"{row['latency_p99_s']:>8.2f} {row['errors']:>6}", flush=True)
            for mode in args.modes:
                if "baseline" in trees:
                    level[f"{mode}_this_over_baseline"] = (level[f"this/{mode}"]["tokens_per_s"]
                                                          / level[f"baseline/{mode}"]["tokens_per_s"])
                    print(f"{'':>7} {mode}: this / baseline aggregate tokens/s "
                          f"{level[f'{mode}_this_over_baseline']:.2f}x")
    finally:
        for server in servers.values():
            server.close()
    if args.overhead_batch:
        if args.model:  # the engine takes token ids
            from tidar_megatron.inference.generate import load_tokenizer

            prompts = [load_tokenizer(model_dir).encode(text) for text in prompts]
        prompts_file = work / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        for mode in args.modes:
            for tree, path in trees.items():
                row = overhead_in(path, args, model_dir, prompts_file, mode)
                results["overhead"][f"{tree}/{mode}"] = row
                print(f"engine vs Decoder, batch {row['batch']}, {tree} {mode}: Decoder {row['decoder_tokens_per_s']:.1f}"
                      f" tok/s, engine {row['engine_tokens_per_s']:.1f} tok/s, ratio {row['decoder_over_engine']:.2f}",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
