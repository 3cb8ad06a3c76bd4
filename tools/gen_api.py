"""Write docs/api.md, the API reference, from the public docstrings (``fusedaccum.__all__``).

    ./dev python tools/gen_api.py            # regenerate docs/api.md
    ./dev python tools/gen_api.py --check    # exit 1 when docs/api.md is not what this writes

tests/test_docs.py runs the check, so the committed reference follows the code. The
docstrings are written for ``help()``; this turns their ``code``, ``Args:`` sections,
``name: text`` lines naming a parameter or field, and ``Usage::`` blocks into Markdown.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "api.md"
# Shown first, in this order; every other public name follows in ``__all__``'s order.
FIRST = ["GradAccumulator", "StepResult", "LossScaler", "GradBuckets", "Bucket",
         "accumulate_", "unscale_clip_", "clip_grad_norm_", "broadcast_parameters"]
HEADER = """# API reference

Generated from the docstrings by `tools/gen_api.py` (regenerate: `./dev python tools/gen_api.py`;
`tests/test_docs.py` fails when this file is stale). Every name here is importable from `fusedaccum`.
"""


def signature(obj, name: str) -> str:
    """``name(arg, *, kw=default)``: annotations left out (the docstrings give the types)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    if params and params[0].name == "self":
        params = params[1:]
    return name + str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def _field(line: str, names: set):
    m = re.match(r"(\w+): (.*)", line)
    return m if m and m.group(1) in names else None


def _field_list(para: list, names: set) -> "list | None":
    """``name: text`` lines (``name`` a parameter or field) with indented continuations, as
    bullets; None when ``para`` is not such a list."""
    if not _field(para[0], names) or not all(line.startswith(" ") or _field(line, names) for line in para):
        return None
    out = []
    for line in para:
        m = _field(line, names)
        out.append(f"- `{m.group(1)}`: {m.group(2)}" if m else "  " + line.strip())
    return out


def _paragraphs(lines: list) -> list:
    paras, para = [], []
    for line in lines + [""]:
        if line.strip():
            para.append(line)
        elif para:
            paras.append(para)
            para = []
    return paras


def markdown(doc: str, names: set = frozenset()) -> str:
    """A docstring as Markdown: ``x`` -> `x`; an ``Args:`` section, and a paragraph of
    ``name: text`` lines naming a parameter or field, -> bullets; the indented block after
    a paragraph ending in ``::`` -> a Python block."""
    paras = _paragraphs(doc.replace("``", "`").splitlines())
    out, i = [], 0
    while i < len(paras):
        para = paras[i]
        i += 1
        if para[0].strip() == "Args:" and len(para) > 1:
            rest = [line[4:] if line.startswith("    ") else line for line in para[1:]]
            out.append(["Arguments:", ""] + (_field_list(rest, names) or rest))
            continue
        out.append(_field_list(para, names) or para)
        if para[-1].endswith("::"):
            para[-1] = para[-1][:-1]
            code = []
            while i < len(paras) and all(line.startswith(" ") for line in paras[i]):
                code += ([""] if code else []) + [line[4:] for line in paras[i]]
                i += 1
            out.append(["```python"] + code + ["```"])
    return "\n\n".join("\n".join(p) for p in out)


def _names(obj) -> set:
    names = set()
    try:
        names |= set(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        pass
    if dataclasses.is_dataclass(obj):
        names |= {f.name for f in dataclasses.fields(obj)}
    return names


def members(cls) -> list:
    """The class's own public methods and properties, in source order."""
    lines = []
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(raw, property):
            doc, head = inspect.getdoc(raw), f"`{cls.__name__}.{name}` (property)"
        elif inspect.isfunction(raw) or isinstance(raw, (staticmethod, classmethod)):
            fn = getattr(cls, name)
            doc, head = inspect.getdoc(fn), f"`{cls.__name__}.{signature(fn, name)}`"
        else:
            continue
        lines += [f"#### {head}", ""] + ([markdown(doc, _names(getattr(cls, name))), ""] if doc else [])
    return lines


def entry(name: str, obj) -> list:
    kind = "class" if inspect.isclass(obj) else "function"
    lines = [f'<a id="{name.lower()}"></a>', "", f"## `{signature(obj, name)}`", "", f"*{kind}*", ""]
    doc = inspect.getdoc(obj)
    if doc and not (kind == "class" and doc == inspect.getdoc(object)):
        lines += [markdown(doc, _names(obj)), ""]
    if kind == "class":
        lines += members(obj)
    return lines


def generate() -> str:
    import fusedaccum

    public = list(fusedaccum.__all__)
    order = [n for n in FIRST if n in public] + [n for n in public if n not in FIRST]
    lines = [HEADER]
    lines += [f"- [`{n}`](#{n.lower()})" for n in order] + [""]
    for name in order:
        lines += entry(name, getattr(fusedaccum, name))
    return "\n".join(lines).rstrip() + "\n"


def main(argv) -> int:
    text = generate()
    if argv == ["--check"]:
        if OUT.read_text() != text:
            print(f"{OUT} is stale: regenerate it with ./dev python tools/gen_api.py", file=sys.stderr)
            return 1
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
