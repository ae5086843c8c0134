#!/usr/bin/env python3
"""Scores replies to the held-out prompts of bench/finetune (the task: make_dataset.py).

Input: a JSONL file, one {"prompt": str, "reply": str} per line (extra keys are ignored), as
peft_generate.py and run_task.sh write. Each prompt is looked up in --heldout (default: the
heldout.jsonl beside this script) for its expected topic and answers; a prompt that is not
there is still checked for the format, with topic and answer counted as wrong.

Per reply (leading and trailing whitespace stripped first):
- PASS / FAIL, the format: the reply is exactly one JSON object written as
  {"answer": "<1-100 chars>", "topic": "<one of the six topics>"} with json.dumps' separators,
  the keys in that order and nothing before or after (FORMAT below). Anything else fails:
  prose, markdown fences, extra keys, a second object, text after the closing brace.
- topic: the topic equals the expected one (only counted for a PASS).
- answer: the answer is right (only counted for a PASS): after lowercasing and dropping
  punctuation it equals one of the accepted answers, or contains one as a whole word
  ("Ottawa, Canada"); a number may also be written as a word ("eight").

Prints one line per reply, then the rates, then one `RESULT {json}` line (n, pass, topic,
answer: counts) for scripts. The exit code is always 0 (it reports, it does not gate): unusable
input (a missing file, a line that is not JSON) prints `error: ...` and a RESULT with n 0 and
an "error" key.

Usage: python3 check.py REPLIES.jsonl [--heldout HELDOUT.jsonl] [--label NAME] [--quiet]
"""

import argparse
import json
import os
import re
import sys

TOPICS = ["math", "geography", "language", "colors", "animals", "counting"]
FORMAT = re.compile(
    r'\{"answer": "((?:[^"\\\n]|\\.){1,100})", "topic": "(' + "|".join(TOPICS) + r')"\}'
)
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty"]


def norm(s):
    return " ".join(re.sub(r"[^\w\s-]", " ", s.lower()).split())


def answer_ok(answer, accept):
    a = norm(answer)
    for acc in accept:
        forms = [norm(acc)]
        if acc.isdigit() and int(acc) < len(NUMBER_WORDS):
            forms.append(NUMBER_WORDS[int(acc)])
        for f in forms:
            if a == f or re.search(r"(?<![\w-])" + re.escape(f) + r"(?![\w-])", a):
                return True
    return False


def check(reply, expected):
    """(format ok, topic ok, answer ok, why) for one reply."""
    text = reply.strip()
    m = FORMAT.fullmatch(text)
    if not m:
        return False, False, False, "not the exact JSON format"
    try:
        obj = json.loads(text)
    except ValueError as e:
        return False, False, False, f"not JSON: {e}"
    answer, topic = obj["answer"], obj["topic"]
    if not answer.strip():
        return False, False, False, "empty answer"
    if expected is None:
        return True, False, False, "prompt not in the held-out set"
    t_ok = topic == expected["topic"]
    a_ok = answer_ok(answer, expected.get("accept") or [expected["answer"]])
    why = []
    if not t_ok:
        why.append(f"topic {topic!r}, expected {expected['topic']!r}")
    if not a_ok:
        why.append(f"answer {answer!r}, expected {expected['answer']!r}")
    return True, t_ok, a_ok, "; ".join(why)


def read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise SystemExit(f"{path}:{i}: not JSON: {e}")
    return rows


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description="score held-out replies (always exits 0)")
    ap.add_argument("replies")
    ap.add_argument("--heldout", default=os.path.join(here, "heldout.jsonl"))
    ap.add_argument("--label", default=None, help="name printed with the rates")
    ap.add_argument("--quiet", action="store_true", help="only the rates and RESULT")
    args = ap.parse_args()
    try:
        held = {h["prompt"]: h for h in read_jsonl(args.heldout)}
        rows = read_jsonl(args.replies)
    except (OSError, SystemExit) as e:
        print(f"error: {e}")
        print("RESULT " + json.dumps({"label": args.label or os.path.basename(args.replies),
                                      "n": 0, "pass": 0, "topic": 0, "answer": 0,
                                      "error": str(e)}))
        return
    label = args.label or os.path.basename(args.replies)
    n = n_pass = n_topic = n_answer = 0
    for row in rows:
        prompt, reply = row.get("prompt", ""), row.get("reply", "")
        ok, t_ok, a_ok, why = check(reply, held.get(prompt))
        n += 1
        n_pass += ok
        n_topic += t_ok
        n_answer += a_ok
        if not args.quiet:
            flags = f"topic {'ok' if t_ok else '--'} answer {'ok' if a_ok else '--'}"
            shown = reply.strip().replace("\n", "\\n")
            shown = shown if len(shown) <= 90 else shown[:87] + "..."
            print(f"{'PASS' if ok else 'FAIL'} [{flags}] {prompt[:60]!r} -> {shown!r}"
                  + (f"  ({why})" if why else ""))
    missing = [p for p in held if p not in {r.get("prompt") for r in rows}]
    pct = lambda k: f"{k}/{n} ({100.0 * k / n:.0f}%)" if n else "0/0"
    print(f"{label}: format pass {pct(n_pass)}, topic right {pct(n_topic)}, "
          f"answer right {pct(n_answer)}"
          + (f"; {len(missing)} held-out prompts have no reply" if missing else ""))
    print("RESULT " + json.dumps({"label": label, "n": n, "pass": n_pass, "topic": n_topic,
                                  "answer": n_answer, "missing": len(missing)}))


if __name__ == "__main__":
    main()
