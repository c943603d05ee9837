"""Tests for tunelab.commands.flags: a command's own flags taken out of argv, the config's arguments left in order."""
from __future__ import annotations

import pytest

from tunelab.commands.flags import take_flags
from tunelab.errors import ConfigError


def test_value_and_bool_flags_in_argv_order_and_the_rest_untouched():
    argv = ["cfg.yaml", "--prompt", "Hi there", "top_k=5", "--compare-base", "--max_new_tokens", "4",
            "--batch-size=3", "--show_prompt=no", "--lora", "a=x", "--lora=b=y", "--", "-v"]
    taken, rest = take_flags(argv, {"prompt", "batch_size", "lora"}, {"compare_base", "show_prompt"})
    assert taken == [("prompt", "Hi there"), ("compare_base", True), ("batch_size", "3"), ("show_prompt", False),
                     ("lora", "a=x"), ("lora", "b=y")]
    assert rest == ["cfg.yaml", "top_k=5", "--max_new_tokens", "4", "--", "-v"]


def test_bool_flag_words():
    words = ["--on", "--on=1", "--on=True", "--on= yes ", "--on=ON", "--on=0", "--on=false", "--on=", "--on=maybe"]
    taken, rest = take_flags(words, (), {"on"})
    assert [v for _, v in taken] == [True, True, True, True, True, False, False, False, False] and rest == []


def test_a_value_flag_takes_the_next_argument_even_when_it_looks_like_a_flag():
    assert take_flags(["--prompt", "--compare-base"], {"prompt"}, {"compare_base"}) == ([("prompt", "--compare-base")], [])


def test_a_value_flag_without_its_value():
    with pytest.raises(ConfigError, match=r"^--batch-size needs a value\.$"):
        take_flags(["cfg.yaml", "--batch-size"], {"batch_size"})
