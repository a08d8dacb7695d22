"""The embedded shapes prompt enhancer on its own: training time, canonical captions returned
unchanged, slot accuracy on paraphrase templates it never saw, and on the shipped terse set.

    uv run python bench/prompt_enhancer.py [--n 2000]

Trains into a fresh temporary cache (so the time is a cold first use). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from trainers.data.shapes import ATTRIBUTE_NAMES
from trainers.data.terse import terse_prompts
from trainers.enhance import ShapesEnhancer, _canonical_captions, paraphrase_eval


def slot_accuracy(enhancer: ShapesEnhancer, items: list[tuple[str, dict[str, str]]]) -> dict:
    predicted = enhancer.predict([p for p, _ in items])
    hits = {a: [0, 0] for a in ATTRIBUTE_NAMES}
    all_right = 0
    for (_, named), attrs in zip(items, predicted, strict=True):
        ok = True
        for a, v in named.items():
            hits[a][1] += 1
            hits[a][0] += getattr(attrs, a) == v
            ok &= getattr(attrs, a) == v
        all_right += ok
    right, total = sum(h[0] for h in hits.values()), sum(h[1] for h in hits.values())
    return {
        "prompts": len(items),
        "named_slots": total,
        "slot_accuracy": right / total,
        "prompts_all_named_right": all_right / len(items),
        "per_slot": {a: h[0] / h[1] for a, h in hits.items() if h[1]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="held-out paraphrases to score")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        enhancer = ShapesEnhancer(cache_dir=cache)
        t0 = time.perf_counter()
        enhancer.net()
        train_s = time.perf_counter() - t0
        captions = [c for c, _ in _canonical_captions()]
        unchanged = sum(a == b for a, b in zip(captions, enhancer.enhance(captions), strict=True))
        out = {
            "version": enhancer.provenance()["version"],
            "train_s_cold": round(train_s, 2),
            "canonical_unchanged": f"{unchanged}/{len(captions)}",
            "heldout_paraphrases": slot_accuracy(enhancer, paraphrase_eval(args.n)),
            "terse_set": slot_accuracy(
                enhancer, [(p.prompt, dict(p.attributes)) for p in terse_prompts()]
            ),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
