"""spawnd-wsgi is described three times: by its argparse parser (--help), by its man page
docs/man/spawnd-wsgi.1 and by docs/spawnd-wsgi.md. These tests fail when they drift
apart: an option one of them lacks or invents, or a default they disagree on.
(test_packaging renders the man page and lints it; nothing here repeats that.)"""
from __future__ import annotations

import os
import re

import pytest

from spawnd.wsgi.main import parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAN = os.path.join(ROOT, "docs", "man", "spawnd-wsgi.1")
MD = os.path.join(ROOT, "docs", "spawnd-wsgi.md")
DEFAULTS = ("--threads", "--graceful-timeout", "--io-timeout", "--backlog")
DEFAULT = re.compile(r"\(default ([^\s;:,)]+)")
OPTION = re.compile(r"(?<![\w-])--?[a-z][a-z-]*")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def actions() -> dict:
    """Every option string argparse knows -> its action."""
    return {s: a for a in parser()._actions for s in a.option_strings}


def help_entries() -> dict[str, str]:
    """Option string -> its entry in the --help text ("-e FILE, --env-file FILE  KEY=...")
    with whitespace collapsed, so the terminal width does not matter."""
    out = {}
    for entry in re.split(r"\n(?=  -)", parser().format_help()):
        entry = " ".join(entry.split("\n\n")[0].split())    # (not the epilog after it)
        head = re.match(r"(?:--?[a-z][a-z-]*(?: [^ ,]+)?, )*--?[a-z][a-z-]*", entry)
        for opt in OPTION.findall(head.group(0)) if head else ():
            out[opt] = entry
    return out


def man_entries(roff: str) -> dict[str, str]:
    """Option string -> the text of its .TP entry in the man page's OPTIONS section
    (font escapes removed, "\\-" read as "-", macro names dropped)."""
    text = re.sub(r"\\f[BIRP]|\\&", "", roff).replace("\\-", "-")
    section = re.search(r"^\.SH OPTIONS\n(.*?)^\.SH ", text, re.M | re.S)
    assert section, "no OPTIONS section in the man page"
    out = {}
    for entry in section.group(1).split(".TP\n")[1:]:
        tag, _, body = entry.partition("\n")
        body = " ".join(re.sub(r"^\.[A-Z]+ ?", "", line).replace('"', "")
                        for line in body.splitlines())
        for opt in OPTION.findall(tag):
            out[opt] = body
    return out


def first_default(text: str) -> str:
    found = DEFAULT.search(text)
    return found.group(1) if found else "none"


def drift(roff: str, md: str) -> list[str]:
    """What the man page and the markdown page disagree with argparse about."""
    known = actions()
    man = man_entries(roff)
    helps = help_entries()
    problems = [f"{opt}: in --help, not in the man page's OPTIONS"
                for opt in sorted(set(known) - set(man))]
    problems += [f"{opt}: in the man page's OPTIONS, unknown to argparse"
                 for opt in sorted(set(man) - set(known))]
    for opt in sorted(o for o in known if o.startswith("--")):
        # --help is argparse's own; the markdown page need not list it
        if known[opt].dest != "help" and not re.search(
                rf"(?<![\w-]){re.escape(opt)}(?![\w-])", md):
            problems.append(f"{opt}: in --help, not in {os.path.basename(MD)}")
    for opt in DEFAULTS:
        said = [first_default(text) for text in (helps.get(opt, ""), man.get(opt, ""))]
        if said[0] != said[1]:
            problems.append(f"{opt}: --help says default {said[0]}, the man page {said[1]}")
    return problems


def test_help_man_page_and_markdown_agree():
    assert drift(read(MAN), read(MD)) == []


@pytest.mark.parametrize("opt", DEFAULTS)
def test_help_states_the_code_default(opt):
    """The default --help prints is the one the parser uses (the man page is held to
    --help above, so to the code through this)."""
    action = actions()[opt]
    said = first_default(help_entries()[opt])
    assert said != "none", f"--help gives no default for {opt}"
    assert action.type(said) == action.default, (opt, said, action.default)


# Each edit of the real pages must be caught, with a message naming what drifted.
MUTATIONS = {
    "man option removed": ("man", '.BI "\\-\\-chdir " dir\n', "",
                           "--chdir: in --help, not in the man page"),
    "man option invented": ("man", ".TP\n.B \\-h, \\-\\-help\n",
                            ".TP\n.B \\-\\-daemon\nDetach.\n.TP\n.B \\-h, \\-\\-help\n",
                            "--daemon: in the man page's OPTIONS, unknown"),
    "man default changed": ("man", "(default 30s)", "(default 20s)", "--graceful-timeout: "
                            "--help says default 30s, the man page 20s"),
    "man default dropped": ("man", "(default 1024)", "",
                            "--backlog: --help says default 1024, the man page none"),
    "md option missing": ("md", "--io-timeout", "--io-deadline",
                          "--io-timeout: in --help, not in spawnd-wsgi.md"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_drift_is_caught(name):
    which, old, new, expected = MUTATIONS[name]
    pages = {"man": read(MAN), "md": read(MD)}
    assert old in pages[which], f"{name}: {old!r} is no longer in the {which} page"
    pages[which] = pages[which].replace(old, new)
    problems = drift(pages["man"], pages["md"])
    assert any(expected in p for p in problems), problems
