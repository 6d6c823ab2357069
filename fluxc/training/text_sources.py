"""Real English prose gathered offline from the documentation installed with Python and its packages.

The training data of `fluxc.training.data` hides needles in, and asks questions about, real text rather
than random tokens. The text comes from three local sources, in this order of preference:

1. the Python Language Reference topics that ship with the interpreter (``pydoc_data.topics``): the held-out
   domain, for evaluation only (`heldout_domain_corpus`);
2. docstrings of the standard library (``sys.stdlib_module_names``), read from the source files, so no
   module is imported and none can run side effects (GUI, network, ``antigravity``);
3. docstrings of installed packages (numpy, torch, transformers, ...), read the same way, only as far
   as needed to reach the requested size.

Each docstring (or reference topic) is a *document*; documents are cleaned (doctest lines, code
blocks, reST markup, field lists and short fragments dropped) and cut into paragraphs of 200-1200
characters kept in their original order, so a run of consecutive paragraphs reads as coherent text.
"""

from __future__ import annotations

import importlib.util
import inspect
import random
import re
import sys
import sysconfig
import warnings
from pathlib import Path

MIN_PARAGRAPH = 200
MAX_PARAGRAPH = 1200

# Top-level stdlib names never read: tests, GUI / IDE code, jokes with side effects, private helpers.
_SKIP_TOP = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
    "pydoc_data", "__phello__", "_pydev_bundle", "msilib", "winreg", "winsound", "_msi", "nturl2path",
})
# Path components that mark test suites or vendored code inside packages.
_SKIP_PARTS = frozenset({"test", "tests", "testing", "_vendor", "vendored", "third_party", "benchmarks"})
# Installed packages read for more prose, in order, only while the corpus is below its requested size.
PACKAGES = ("numpy", "torch", "transformers", "sympy", "networkx", "setuptools", "pydantic", "requests")

_ROLE = re.compile(r":[a-zA-Z_:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`name` -> name
_BACKTICKS = re.compile(r"`{1,2}([^`]*)`{1,2}_?")
_WORD = re.compile(r"^[\(\"'\[]?[A-Za-z][a-z]*(?:[-'][a-z]+)*[\)\"'\]]?[.,;:!?]?[\)\"']?$")
_CODE_CHARS = set("{}[]=<>_\\|@#$%^*~/+")
_TRIPLE = re.compile(r"""(?s)(\"\"\"|''')(.*?)\1""")
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Params|Returns?|Raises|Yields?|Attributes|Examples?|"
                      r"Notes?|Shapes?|Inputs?|Outputs?|Keyword [Aa]rgs|Kwargs|See [Aa]lso|Warnings?|"
                      r"Todo|References|Usage|Methods|Properties|Type|Variables)\s*:")
_SENTENCE_END = re.compile(r"(?<=[a-z0-9\)\"'][.!?])\s+(?=[A-Z])")

_DOCS: dict[str, list[tuple[str, list[str]]]] = {}  # source -> [(document name, paragraphs)]
_CORPUS: dict[tuple[int, int], list[str]] = {}


def _is_prose_line(line: str) -> bool:
    s = line.strip()
    if not s:
        return True
    if s.startswith((">>>", "...", "..", ":", "$ ", "% ", "#", "|", "+-", "-->")):
        return False
    if re.fullmatch(r"[-=~*^#+`'\".:_ ]{3,}", s):  # reST underline / rule
        return False
    return True


def _is_prose_block(text: str) -> bool:
    words = text.split()
    if len(words) < 8:
        return False
    wordlike = sum(bool(_WORD.match(w)) for w in words) / len(words)
    code = sum(c in _CODE_CHARS for c in text) / len(text)
    digits = sum(c.isdigit() for c in text) / len(text)
    return wordlike >= 0.75 and code < 0.02 and digits < 0.05 and re.search(r"[a-z][.!?:]", text) is not None


def _blocks(doc: str) -> list[str]:
    """Prose blocks of one docstring: blank-line separated, indented (code) blocks and markup dropped."""
    out: list[str] = []
    for raw in re.split(r"\n\s*\n", doc.expandtabs()):
        lines = raw.split("\n")
        for i, ln in enumerate(lines):  # a Google-style section (Args:, Returns:, ...) ends the prose
            if _SECTION.match(ln):
                lines = lines[:i]
                break
        if not any(ln.strip() for ln in lines):
            continue
        if any(not _is_prose_line(ln) for ln in lines):
            continue
        indents = [len(ln) - len(ln.lstrip()) for ln in lines if ln.strip()]
        if not indents or min(indents) >= 4:  # literal / code block or argument description list
            continue
        text = " ".join(ln.strip() for ln in lines)
        text = _ROLE.sub(r"\1", text)
        text = _BACKTICKS.sub(r"\1", text).replace("**", "").replace("*", "")
        text = re.sub(r"\s+", " ", text).strip()
        if text.endswith("::"):
            text = text[:-1]
        if _is_prose_block(text):
            out.append(text)
    return out


def _split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s]


def _paragraphs(doc: str) -> list[str]:
    """Cut the prose of one document into paragraphs of MIN_PARAGRAPH..MAX_PARAGRAPH characters."""
    out: list[str] = []
    cur = ""
    for block in _blocks(doc):
        for sentence in _split_sentences(block) if len(block) > MAX_PARAGRAPH else [block]:
            if len(sentence) > MAX_PARAGRAPH:
                continue
            if cur and len(cur) + 1 + len(sentence) > MAX_PARAGRAPH:
                if len(cur) >= MIN_PARAGRAPH:
                    out.append(cur)
                cur = sentence
            else:
                cur = f"{cur} {sentence}" if cur else sentence
        if len(cur) >= MIN_PARAGRAPH:  # a paragraph ends with its block once it is long enough
            out.append(cur)
            cur = ""
    if len(cur) >= MIN_PARAGRAPH:
        out.append(cur)
    return out


def _docstrings(path: Path) -> str:
    """The triple-quoted strings (docstrings, documentation constants) of one source file, in source order.

    A regular expression rather than `ast`: parsing every file of a large package costs seconds, and
    whatever is not prose is dropped by the cleaning anyway.
    """
    try:
        src = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""
    return "\n\n".join(inspect.cleandoc(m.group(2)) for m in _TRIPLE.finditer(src))


def _module_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.py")
                  if not _SKIP_PARTS.intersection(p.relative_to(root).parts[:-1])
                  and not p.name.startswith("test_"))


def _source_root(name: str) -> Path | None:
    """File or package folder of a top-level module, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin and spec.origin.endswith(".py"):
        return Path(spec.origin)
    return None


def _documents_from(roots: list[tuple[str, Path]]) -> list[tuple[str, list[str]]]:
    docs = []
    for name, root in roots:
        for path in _module_files(root):
            paras = _paragraphs(_docstrings(path))
            if paras:
                docs.append((f"{name}/{path.relative_to(root.parent).as_posix()}", paras))
    return docs


def _source(source: str) -> list[tuple[str, list[str]]]:
    if source in _DOCS:
        return _DOCS[source]
    docs: list[tuple[str, list[str]]] = []
    if source == "reference":
        try:
            from pydoc_data.topics import topics
        except ImportError:
            topics = {}
        docs = [(f"reference:{k}", p) for k in sorted(topics) if (p := _paragraphs(topics[k]))]
    elif source == "stdlib":
        stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
        roots = []
        for name in sorted(sys.stdlib_module_names):
            if name in _SKIP_TOP or name.startswith("_"):
                continue
            root = _source_root(name)
            if root is not None and root.resolve().is_relative_to(stdlib):
                roots.append((name, root))
        docs = _documents_from(roots)
    else:
        root = _source_root(source)
        docs = _documents_from([(source, root)]) if root is not None and root.is_dir() else []
    _DOCS[source] = docs
    return docs


# The text domain training never reads: the Python Language Reference (specification prose), against the
# docstrings (API prose) that training draws from. Evaluation draws from it too, to measure a domain shift.
HELD_OUT_SOURCE = "reference"


def heldout_domain_corpus(seed: int = 0) -> list[str]:
    """Paragraphs of `HELD_OUT_SOURCE`, documents shuffled with `random.Random(seed)` (in order within one)."""
    docs = sorted(_source(HELD_OUT_SOURCE))
    random.Random(seed).shuffle(docs)
    return [p for _, paras in docs for p in paras]


def text_corpus(min_chars: int = 2_000_000, seed: int = 0) -> list[str]:
    """Paragraphs (200-1200 characters) of real English prose from the locally installed documentation,
    without the held-out domain (`heldout_domain_corpus`).

    Sources are read in a fixed order (stdlib docstrings, then `PACKAGES`) until `min_chars` characters of
    unique paragraphs are gathered. Documents are shuffled with `random.Random(seed)`; the paragraphs of one
    document stay consecutive and in order. Deterministic for a given (min_chars, seed) on a given
    installation; cached in memory.
    """
    key = (min_chars, seed)
    if key in _CORPUS:
        return list(_CORPUS[key])
    seen: set[str] = set()
    docs: list[tuple[str, list[str]]] = []
    total = 0
    for source in ("stdlib", *PACKAGES):
        if total >= min_chars:
            break
        for name, paras in _source(source):
            fresh = []
            for p in paras:
                norm = " ".join(p.lower().split())
                if norm not in seen:
                    seen.add(norm)
                    fresh.append(p)
            if fresh:
                docs.append((name, fresh))
                total += sum(map(len, fresh))
    if total < min_chars:
        warnings.warn(f"only {total} characters of prose found offline (asked for {min_chars})", stacklevel=2)
    docs.sort()
    random.Random(seed).shuffle(docs)
    corpus = [p for _, paras in docs for p in paras]
    _CORPUS[key] = corpus
    return list(corpus)
