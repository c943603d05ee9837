"""`tunelab chat`: talk to a base or fine-tuned model, interactively or from a script.

    tunelab chat model_name_or_path=Qwen/Qwen2.5-7B-Instruct quantization_bit=4       # check a base model in 4-bit
    tunelab chat cfg.yaml adapter_name_or_path=saves/run checkpoint=best              # a run's best checkpoint
    tunelab chat cfg.yaml --compare-base                                              # base vs fine-tuned, per prompt
    tunelab chat cfg.yaml do_sample=false --prompt "Hello"                            # the answer alone on stdout
    tunelab chat cfg.yaml --prompts questions.jsonl --out answers.jsonl               # batched, JSONL out

Interactive: answers stream as they are generated; the history is kept across turns; `clear` resets it, `exit`
(or Ctrl-D) quits, Ctrl-C stops the current answer and keeps the chat open (the part shown stays in the history).
Without a terminal on stdin (a pipe, tmux send-keys, a test) every line is one user turn, and there is no
`User:` prompt. Logs and progress go to stderr, answers to stdout, so scripts capture answers alone.

This module is the terminal: everything model-side (template, stop tokens, batching, streaming) is the engine's.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import unicodedata
from dataclasses import dataclass
from typing import IO, Any, Iterator

from tunelab.errors import ConfigError, DataError

USAGE = (
    "usage: tunelab chat [config.yaml] [key=value ...] [--key value ...]\n"
    "                    [--prompt TEXT | --prompts FILE.txt|.jsonl [--out FILE.jsonl]]\n"
    "                    [--compare-base] [--show-prompt] [--batch-size N]"
)
FLAGS_HELP = """chat options:
  --prompt TEXT       answer one prompt and print only the answer on stdout
  --prompts FILE      answer every prompt of a .txt (one per line) or .jsonl file ({"prompt"|"instruction"+"input"|
                      "messages", optional "system", "id"}); writes JSONL {"prompt", "answer"[, "base_answer"], ...}
  --out FILE          where --prompts writes its JSONL (default: stdout)
  --compare-base      answer with the base model too (the adapter switched off), side by side on wide terminals
  --show-prompt       print the exact prompt text the model sees (after the chat template) to stderr
  --batch-size N      prompts per generation batch for --prompts (default 8)

  checkpoint=best|last|checkpoint-N picks a checkpoint of the run given as adapter_name_or_path (as in export).
"""
SECTIONS = ("model", "quantization", "generation")
_VALUE_FLAGS = ("prompt", "prompts", "out", "batch_size")
_BOOL_FLAGS = ("compare_base", "show_prompt")
SIDE_BY_SIDE_MIN_COLUMNS = 100
BASE, TUNED = "base", "fine-tuned"


@dataclass
class ChatOptions:
    prompt: str | None = None
    prompts: str | None = None
    out: str | None = None
    batch_size: int = 8
    compare_base: bool = False
    show_prompt: bool = False


def split_options(argv: list[str]) -> tuple[ChatOptions, list[str]]:
    """Take chat's own flags out of argv; the rest (config file, key=value, --key value) is the config."""
    from tunelab.commands.flags import take_flags

    taken, rest = take_flags(argv, _VALUE_FLAGS, _BOOL_FLAGS)
    opts: dict[str, Any] = dict(taken)  # a repeated flag: the last one wins
    if "batch_size" in opts:
        try:
            opts["batch_size"] = int(opts["batch_size"])
        except ValueError:
            raise ConfigError(f"--batch-size {opts['batch_size']!r} is not valid: expected a positive integer.") from None
        if opts["batch_size"] < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {opts['batch_size']}.")
    result = ChatOptions(**opts)
    if result.prompt is not None and result.prompts is not None:
        raise ConfigError("--prompt and --prompts are both given: choose one.")
    if result.out is not None and result.prompts is None:
        raise ConfigError("--out is for --prompts (a JSONL of answers); --prompt prints its answer on stdout.")
    return result, rest


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        from tunelab.config.help import format_help

        print(format_help("chat", USAGE, SECTIONS) + "\n" + FLAGS_HELP)
        return 0
    from tunelab.config import load_config
    from tunelab.utils.logging import setup_logging

    opts, rest = split_options(argv)
    cfg = load_config(rest)  # validated before anything heavy is imported
    prompts = read_prompts(opts.prompts) if opts.prompts else None  # a bad file fails before the model loads
    setup_logging()
    from tunelab.config.parse import parse_cli_args
    from tunelab.model.loader import model_source, use_trained_adapter

    if cfg.model_name_or_path:
        model_source(cfg.model_name_or_path)  # a missing local folder fails here, not after a hub lookup
    cfg = use_trained_adapter(cfg, "chat", set(parse_cli_args(rest)[1]))
    from tunelab.infer import Engine

    engine = Engine.from_config(cfg, max_batch_size=opts.batch_size)
    if opts.compare_base and not engine.has_adapter:
        raise ConfigError("--compare-base compares the base model with a fine-tuned one: set adapter_name_or_path.")
    if opts.prompt is not None:
        answer_one(engine, opts, sys.stdout)
    elif prompts is not None:
        answer_file(engine, prompts, opts)
    else:
        interactive(engine, opts, sys.stdin, sys.stdout)
    return 0


# ---------------------------------------------------------------------------------------- non-interactive
def _conversation(text: str, system: str | None = None):
    from tunelab.data.conversation import Conversation

    return Conversation(messages=[{"role": "user", "content": text}], system=system)


def _show_prompt(engine, conv, label: str = "") -> None:
    print(f"[prompt{' ' + label if label else ''}] {engine.render(conv)!r}", file=sys.stderr, flush=True)


def answer_one(engine, opts: ChatOptions, out: IO[str]) -> None:
    """--prompt: the answer alone on stdout (with --compare-base, both answers under headers)."""
    conv = _conversation(opts.prompt)
    if opts.show_prompt:
        _show_prompt(engine, conv)
    answer = engine.generate([conv])[0]
    if not opts.compare_base:
        print(answer, file=out, flush=True)
        return
    with engine.adapter_disabled():
        base = engine.generate([conv])[0]
    print_pair(base, answer, out)


def read_prompts(path: str) -> list[dict[str, Any]]:
    """Prompts of a .txt (one per non-empty line) or .jsonl file as {"conv", "prompt", "extra"} records."""
    from tunelab.data.conversation import Conversation

    if not os.path.isfile(path):
        raise DataError(f"--prompts file '{path}' does not exist.")
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8-sig") as fh:
        lines = fh.read().splitlines()
    if not path.endswith((".jsonl", ".json")):
        return [{"conv": _conversation(line.strip()), "prompt": line.strip(), "extra": {}} for line in lines if line.strip()]
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg}).") from None
        if isinstance(row, str):
            row = {"prompt": row}
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object like {{\"prompt\": \"...\"}}, found {type(row).__name__}.")
        system = row.get("system")
        if isinstance(row.get("messages"), list) and row["messages"]:
            messages = [dict(m) for m in row["messages"]]
            if messages[0].get("role") == "system":
                system = messages.pop(0).get("content")
            if not messages or messages[-1].get("role") not in ("user", "tool"):
                raise DataError(f"{where}: \"messages\" must end with a user message to answer.")
            conv = Conversation(messages=messages, system=system, source=where)
            prompt = messages[-1].get("content", "")
        else:
            prompt = next((row[k] for k in ("prompt", "query", "question", "instruction") if isinstance(row.get(k), str)), None)
            if prompt is None:
                raise DataError(f"{where}: no prompt found; give \"prompt\" (or \"instruction\" + \"input\", or \"messages\").")
            if row.get("input"):
                prompt = f"{prompt}\n{row['input']}"
            conv = Conversation(messages=[{"role": "user", "content": prompt}], system=system, source=where)
        extra = {k: row[k] for k in ("id",) if k in row}
        records.append({"conv": conv, "prompt": prompt, "extra": extra})
    if not records:
        raise DataError(f"--prompts file '{path}' holds no prompt.")
    return records


def answer_file(engine, prompts: list[dict[str, Any]], opts: ChatOptions) -> None:
    """--prompts: batched answers, one JSON line per prompt, in the file's order."""
    import logging

    convs = [p["conv"] for p in prompts]
    if opts.show_prompt:
        for conv in convs:
            _show_prompt(engine, conv)
    logging.getLogger(__name__).info("answering %d prompts (batches of %d)", len(convs), opts.batch_size)
    answers = engine.generate(convs)
    base_answers = None
    if opts.compare_base:
        with engine.adapter_disabled():
            base_answers = engine.generate(convs)
    lines = []
    for i, p in enumerate(prompts):
        rec = {**p["extra"], "prompt": p["prompt"], "answer": answers[i]}
        if base_answers is not None:
            rec["base_answer"] = base_answers[i]
        lines.append(json.dumps(rec, ensure_ascii=False))
    text = "\n".join(lines) + "\n"
    if opts.out:
        from tunelab.utils.io import atomic_write_text

        atomic_write_text(opts.out, text)
        logging.getLogger(__name__).info("answers written to %s", opts.out)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------- interactive
def interactive(engine, opts: ChatOptions, inp: IO[str], out: IO[str]) -> None:
    """The chat loop: one user turn per line; `clear`, `exit`; Ctrl-C stops an answer, not the chat."""
    from tunelab.infer import ChatSession

    tty = inp.isatty()
    sessions = {TUNED: ChatSession(system=engine.system)}
    if opts.compare_base:
        sessions[BASE] = ChatSession(system=engine.system)  # each model sees its own answers in the history
    print("Chat ready: type a message; `clear` resets the history, `exit` quits; Ctrl-C stops an answer.", file=sys.stderr, flush=True)
    while True:
        line = _read_line(inp, out, tty)
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text.lower() in ("exit", "quit"):
            break
        if text.lower() == "clear":
            for session in sessions.values():
                session.clear()
            print("(history cleared)", file=sys.stderr, flush=True)
            continue
        if opts.compare_base:
            compare_turn(engine, sessions, text, opts, out)
        else:
            reply = stream_answer(engine, sessions[TUNED].conversation(text), out, "Assistant", opts.show_prompt)
            sessions[TUNED].add(text, reply)


def _read_line(inp: IO[str], out: IO[str], tty: bool) -> str | None:
    """The next user line, or None at end of input. Ctrl-C at the prompt only reminds how to quit."""
    while True:
        try:
            if tty:
                return input("User: ")
            line = inp.readline()
            return line if line else None
        except EOFError:
            return None
        except KeyboardInterrupt:
            print("\n(type exit or press Ctrl-D to quit)", file=sys.stderr, flush=True)
            if not tty:
                return None


def stream_answer(engine, conv, out: IO[str], label: str, show_prompt: bool = False) -> str:
    """Print the answer as it is generated; Ctrl-C stops it. Returns the text shown."""
    if show_prompt:
        _show_prompt(engine, conv, label.lower())
    out.write(f"{label}: ")
    out.flush()
    shown: list[str] = []
    pieces: Iterator[str] = engine.stream(conv)
    try:
        for piece in pieces:
            shown.append(piece)
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        pieces.close()  # stops the decode thread at its next token
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    return "".join(shown)


def compare_turn(engine, sessions: dict, text: str, opts: ChatOptions, out: IO[str]) -> None:
    """Base and fine-tuned answers to one turn: side by side on a wide terminal, else one after the other."""
    convs = {name: sessions[name].conversation(text) for name in (BASE, TUNED)}
    if terminal_columns() >= SIDE_BY_SIDE_MIN_COLUMNS:
        if opts.show_prompt:
            for name, conv in convs.items():
                _show_prompt(engine, conv, name)
        try:
            with engine.adapter_disabled():
                base = engine.generate([convs[BASE]])[0]
            tuned = engine.generate([convs[TUNED]])[0]
        except KeyboardInterrupt:
            out.write("[stopped]\n")
            out.flush()
            return
        print_pair(base, tuned, out)
    else:
        with engine.adapter_disabled():
            base = stream_answer(engine, convs[BASE], out, "Base", opts.show_prompt)
        tuned = stream_answer(engine, convs[TUNED], out, "Fine-tuned", opts.show_prompt)
    sessions[BASE].add(text, base)
    sessions[TUNED].add(text, tuned)


def terminal_columns() -> int:
    return shutil.get_terminal_size((80, 24)).columns


def print_pair(base: str, tuned: str, out: IO[str]) -> None:
    """Two answers side by side when the terminal is wide enough, else one after the other."""
    columns = terminal_columns()
    if columns < SIDE_BY_SIDE_MIN_COLUMNS:
        out.write(f"Base: {base}\nFine-tuned: {tuned}\n")
        out.flush()
        return
    width = (columns - 3) // 2
    left, right = _wrap(base, width), _wrap(tuned, width)
    rows = [(BASE, TUNED), ("-" * width, "-" * width)]
    rows += [(left[i] if i < len(left) else "", right[i] if i < len(right) else "") for i in range(max(len(left), len(right)))]
    for a, b in rows:
        out.write(f"{_pad(a, width)} | {b}".rstrip() + "\n")
    out.flush()


def _wrap(text: str, width: int) -> list[str]:
    """Word-wrapped lines of at most `width` display columns (wide CJK characters count two)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if _width(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:  # a word wider than a column is cut
                if _width(line + ch) > width:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    return lines


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _width(text))
