"""Write a deterministic ShareGPT jsonl like the tutorials' 137,000-line file, for timing `tunelab data`.

    python tools/make_sharegpt_137k.py /tmp/sharegpt_137k.jsonl            # 137,000 lines, about 300 MB
    python tools/make_sharegpt_137k.py /tmp/small.jsonl --lines 1000 --seed 1

Each line: {"id", "conversations": [{"from": "human"|"gpt", "value"}, ...], "score", "lang"} with 1-4 exchanges,
Chinese, English or mixed text (random words / characters from fixed pools), a system field on about 1 in 10, and
about 1 in 100 an exact repeat of an earlier conversation (under a new id), so stats has duplicates to find.
The same arguments always give the same bytes. The file is a benchmark input: keep it out of the repository.
"""
from __future__ import annotations

import argparse
import json
import random

EN_WORDS = (
    "the model learns to answer questions about data training loss gradient token sequence because when where "
    "which function value result example problem solution first second then finally however therefore we you it "
    "is are was were be have has can will should could would large small fast slow memory compute layer attention "
    "weight matrix vector batch epoch learning rate adapter rank alpha dropout dataset prompt response user "
    "assistant system template chat history context window length number step check test file line record field"
).split()
ZH_CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多"
    "定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由"
    "其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意"
    "建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统"
    "接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导"
    "器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示"
    "模型训练数据学习问题答案计算方法步骤结果首先然后最后因此所以我们可以需要使用"
)
PUNCT_ZH = "，。？！；："


def _english(rng: random.Random, lo: int, hi: int) -> str:
    words = rng.choices(EN_WORDS, k=rng.randint(lo, hi))
    sentences, i = [], 0
    while i < len(words):
        n = rng.randint(6, 18)
        chunk = " ".join(words[i:i + n])
        sentences.append(chunk[:1].upper() + chunk[1:] + rng.choice(".?!"))
        i += n
    return " ".join(sentences)


def _chinese(rng: random.Random, lo: int, hi: int) -> str:
    chars = rng.choices(ZH_CHARS, k=rng.randint(lo, hi))
    out, i = [], 0
    while i < len(chars):
        n = rng.randint(8, 30)
        out.append("".join(chars[i:i + n]) + rng.choice(PUNCT_ZH))
        i += n
    return "".join(out)


def _text(rng: random.Random, lang: str, reply: bool) -> str:
    scale = 3 if reply else 1
    if lang == "en":
        return _english(rng, 12 * scale, 66 * scale)
    if lang == "zh":
        return _chinese(rng, 21 * scale, 108 * scale)
    return _chinese(rng, 8 * scale, 50 * scale) + "\n" + _english(rng, 7 * scale, 33 * scale)


def make_record(rng: random.Random, index: int) -> dict:
    lang = rng.choices(("en", "zh", "mixed"), weights=(5, 4, 1))[0]
    turns = []
    for _ in range(rng.choice((1, 1, 2, 2, 3, 4))):
        turns.append({"from": "human", "value": _text(rng, lang, reply=False)})
        turns.append({"from": "gpt", "value": _text(rng, lang, reply=True)})
    record = {"id": f"conv-{index:06d}", "conversations": turns, "score": round(rng.random() * 10, 2), "lang": lang}
    if rng.random() < 0.1:
        record["system"] = "You are a helpful assistant." if lang == "en" else "你是一个乐于助人的助手。"
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output .jsonl path")
    parser.add_argument("--lines", type=int, default=137_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    earlier: list[dict] = []
    with open(args.out, "w", encoding="utf-8") as fh:
        for i in range(args.lines):
            if earlier and rng.random() < 0.01:
                record = dict(rng.choice(earlier), id=f"conv-{i:06d}")
            else:
                record = make_record(rng, i)
                if len(earlier) < 1000:
                    earlier.append(record)
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
