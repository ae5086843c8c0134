"""Load test of an OpenAI-compatible server: N concurrent streams of P-token prompts and
A-token answers (EOS ignored), started together, for each N. Reports aggregate output tok/s
(completion tokens of all streams / wall time from the first request to the last token), time
to first token (median, p99) and inter-token latency (gaps between streamed chunks, median and
p99, pooled over the streams). Standard library only.

Usage: python serve_load.py --url http://127.0.0.1:8080 [--streams 1,8,32,64]
           [--prompt-tokens 128] [--max-tokens 256] [--label TEXT] [--json OUT.json]
"""
import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse


def post(url, body, stream):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    if not stream:
        return json.loads(r.read())
    return r


def calibrate(url, want):
    """A prompt of about `want` tokens (counted by the server's own tokenizer)."""
    words = want
    for _ in range(6):
        prompt = " ".join(f"w{i % 97}" for i in range(words))
        got = post(url, {"prompt": prompt, "max_tokens": 1, "temperature": 0}, False)["usage"]["prompt_tokens"]
        if got == want:
            break
        words = max(1, round(words * want / got))
    return prompt, got


def one_stream(url, prompt, max_tokens, start, out, i):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start.wait()
    t0 = time.perf_counter()
    r = post(url, body, True)
    chunks, tokens = [], None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        ev = json.loads(data)
        if ev.get("usage"):
            tokens = ev["usage"]["completion_tokens"]
        if ev["choices"] and ev["choices"][0].get("text"):
            chunks.append(time.perf_counter())
    out[i] = (t0, chunks, tokens)


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def run(url, n, prompt, max_tokens):
    start = threading.Barrier(n)
    out = [None] * n
    threads = [threading.Thread(target=one_stream, args=(url, prompt, max_tokens, start, out, i))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(o is None for o in out):
        raise RuntimeError("a stream failed (see above)")
    t_begin = min(o[0] for o in out)
    t_end = max(o[1][-1] for o in out if o[1])
    tokens = sum(o[2] for o in out)
    ttft = [o[1][0] - o[0] for o in out if o[1]]
    gaps = [b - a for o in out for a, b in zip(o[1], o[1][1:])]
    chunks = sum(len(o[1]) for o in out)
    return {
        "streams": n, "completion_tokens": tokens, "chunks": chunks,
        "wall_s": t_end - t_begin, "tok_s": tokens / (t_end - t_begin),
        "ttft_median_ms": 1e3 * statistics.median(ttft), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
        "itl_median_ms": 1e3 * statistics.median(gaps), "itl_p99_ms": 1e3 * pct(gaps, 0.99),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--streams", default="1,8,32,64")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--label", default="")
    ap.add_argument("--json")
    a = ap.parse_args()
    prompt, got = calibrate(a.url, a.prompt_tokens)
    run(a.url, 1, prompt, 8)  # warm-up
    rows = []
    print(f"{a.label}: prompt {got} tokens, {a.max_tokens} tokens per answer", file=sys.stderr)
    for n in [int(s) for s in a.streams.split(",")]:
        r = run(a.url, n, prompt, a.max_tokens)
        r.update(label=a.label, prompt_tokens=got)
        rows.append(r)
        print(f"  {n:3d} streams: {r['tok_s']:8.1f} tok/s  TTFT {r['ttft_median_ms']:7.1f} / "
              f"{r['ttft_p99_ms']:7.1f} ms  ITL {r['itl_median_ms']:6.2f} / {r['itl_p99_ms']:6.2f} ms "
              f"({r['chunks']} chunks for {r['completion_tokens']} tokens)", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
