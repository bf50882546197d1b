"""The PDF: the paper's markdown and LaTeX math converted to Typst markup, compiled by the typst package."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import click

from .sources import rel

_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "lambda", "mu", "nu", "rho", "sigma", "Sigma",
          "Lambda", "Phi", "phi", "omega", "pi", "tau", "Delta", "theta"}
_SYMBOLS = {"circ": "compose", "odot": "dot.o", "cdot": "dot.op", "top": "top", "leftarrow": "<-",
            "to": "->", "le": "<=", "ge": ">=", "in": "in", "approx": "approx", "sum": "sum",
            "times": "times", "ldots": "...", "log": "log", "quad": "quad", "partial": "partial",
            ",": "thin", "bar": "overline", "hat": "hat", "tilde": "tilde", "sqrt": "sqrt"}
_MATH_TOKEN = re.compile(r"\\[A-Za-z]+|\\.|[A-Za-z]|\d+|\s+|.")


def latex_to_typst(src: str) -> str:
    """The LaTeX math subset of this paper → Typst math (ValueError on anything else)."""
    tokens = [t for t in _MATH_TOKEN.findall(src) if not t.isspace()]
    pos = 0

    def seq(until: str | None) -> str:
        nonlocal pos
        out: list[str] = []
        while pos < len(tokens) and tokens[pos] != until:
            piece = step()
            if (piece[:1] in "^_" or piece == "'") and out:
                out[-1] += piece  # an attachment sticks to its base
            else:
                out.append(piece)
        pos += 1  # past the closing brace
        return " ".join(out)

    def group() -> str:
        nonlocal pos
        pos += 1
        return seq("}") if tokens[pos - 1] == "{" else atom(tokens[pos - 1])

    def raw_group() -> str:
        nonlocal pos
        assert tokens[pos] == "{", src
        end = tokens.index("}", pos)
        text = "".join(tokens[pos + 1:end])
        pos = end + 1
        return text

    def atom(t: str) -> str:
        if t.startswith("\\"):
            name = t[1:]
            if name in _GREEK:
                return name
            if name == "|":
                return "||"
            if name in _SYMBOLS and name not in ("bar", "hat", "tilde", "sqrt"):
                return _SYMBOLS[name]
            raise ValueError(f"no Typst form for \\{name} in math {src!r}")
        return t

    def step() -> str:
        nonlocal pos
        t = tokens[pos]
        pos += 1
        if t == "{":
            return seq("}")
        if t in ("^", "_"):
            return t + "(" + group() + ")"
        if t == "\\frac":
            a = group()
            return f"({a})/({group()})"
        if t in ("\\operatorname", "\\mathrm", "\\text"):
            return f'"{raw_group()}"'
        if t in ("\\bar", "\\hat", "\\tilde", "\\sqrt"):
            return f"{_SYMBOLS[t[1:]]}({group()})"
        return atom(t)

    return seq(None)


_PUNCT = set("\\#$*_<>@[]~`/'\"=-+:")


def _escape(text: str) -> str:
    return "".join("\\" + ch if ch in _PUNCT else ch for ch in text)


_INLINE = re.compile(r"`([^`]+)`|\$([^$]+)\$|\*\*(.+?)\*\*|\[([^\]]+)\]\(([^)]+)\)")


def _inline(text: str) -> str:
    out, last = [], 0
    for m in _INLINE.finditer(text):
        out.append(_escape(text[last:m.start()]))
        code, math_, bold, label, url = m.groups()
        if code is not None:
            out.append("`" + code + "`")
        elif math_ is not None:
            out.append("$" + latex_to_typst(math_) + "$")
        elif bold is not None:
            out.append("*" + _inline(bold) + "*")
        else:
            out.append(f'#link("{url}")[{_inline(label)}]')
        last = m.end()
    out.append(_escape(text[last:]))
    return "".join(out)


def _table(rows: list[str]) -> str:
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    head, body = cells[0], cells[2:]
    size = "7pt" if len(head) > 6 else "8pt"
    items = ", ".join(f"[{_inline(c)}]" for c in head)
    body_items = ", ".join(f"[{_inline(c)}]" for row in body for c in row)
    return (f"#block(breakable: true, text(size: {size}, table(columns: {len(head)}, align: left, "
            f"stroke: 0.4pt + gray, table.header({items}), {body_items})))")


def to_typst(markdown: str, image_root: Path, md_dir: Path) -> str:
    """The paper's markdown as Typst markup; images become figures with paths from ``image_root``
    (the compiler's root), resolved against ``md_dir``."""
    out = ['#set page(paper: "a4", margin: 2cm, numbering: "1")',
           '#set text(font: "Libertinus Serif", size: 10pt)',
           "#set par(justify: true)", '#set heading(numbering: "1.1")',
           "#show raw: set text(size: 8pt)", ""]
    lines = markdown.splitlines()
    i, para = 0, []

    def flush() -> None:
        if para:
            out.append(_inline(" ".join(para)))
            out.append("")
            para.clear()

    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            flush()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            out += [line, *lines[i + 1:end], "```", ""]
            i = end + 1
            continue
        if line.strip() == "$$":
            flush()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "$$")
            out += ["$ " + latex_to_typst(" ".join(lines[i + 1:end])) + " $", ""]
            i = end + 1
            continue
        if line.startswith("|"):
            flush()
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            out += [_table(lines[i:end]), ""]
            i = end
            continue
        m = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip())
        if m:
            flush()
            path = "/" + rel((md_dir / m.group(2)), image_root.resolve())
            out += [f'#figure(image("{path}", width: 88%, height: 10cm, fit: "contain"), '
                    f'caption: [{_inline(m.group(1))}])', ""]
        elif line.startswith("#"):
            flush()
            level = len(line) - len(line.lstrip("#"))
            heading = _inline(line[level:].strip())
            if level == 1:
                out += [f"#align(center, text(size: 16pt, weight: \"bold\")[{heading}])", ""]
            else:
                out += ["=" * (level - 1) + " " + heading, ""]
        elif line.startswith("- "):
            flush()
            item = [line[2:]]
            while i + 1 < len(lines) and lines[i + 1].startswith("  ") and lines[i + 1].strip():
                i += 1
                item.append(lines[i].strip())
            out.append("- " + _inline(" ".join(item)))
        elif not line.strip():
            flush()
            out.append("")
        else:
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(out) + "\n"


def build_pdf(markdown: str, out: Path, root: Path) -> bytes:
    """The PDF of the paper's markdown; figures resolved under ``root``."""
    try:
        import typst
    except ImportError as exc:
        raise click.ClickException("the PDF needs the typst package: pip install 'exoticnorm[paper]' "
                                   "(or pass --no-pdf)") from exc
    source = to_typst(markdown, root, out)
    with tempfile.TemporaryDirectory() as small:
        for path in re.findall(r'image\("/([^"]+)"', source):
            _shrink(Path(root) / path, Path(small) / path)
        try:
            return typst.compile(source.encode(), root=small, ignore_system_fonts=True, timestamp=0)
        except Exception as exc:  # typst raises its own error types with the compiler's message
            (out / "paper.typ").write_text(source)
            raise click.ClickException(f"typst could not compile the paper ({out / 'paper.typ'} kept): {exc}") from exc


#: figure width in the PDF, pixels: 88% of an A4 text column at about 120 dpi
FIGURE_PX = 800


def _shrink(src: Path, dst: Path) -> None:
    """A copy of the PNG ``src`` at most FIGURE_PX wide in 64 colours (the committed PDF stays
    small; the full figures are in the studies' folders)."""
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im = im.convert("RGB")
        if im.width > FIGURE_PX:
            im = im.resize((FIGURE_PX, round(im.height * FIGURE_PX / im.width)), Image.LANCZOS)
        im.quantize(64).save(dst, optimize=True)
