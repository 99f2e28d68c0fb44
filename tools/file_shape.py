"""The shape of train_gpt.py, as issue 23 measures it: lines and KB per section, the kinds of lines, the
longest functions, the functions with 7+ parameters, and how many lines each guard or optional capability
takes (top-level definitions only, each with the blank line after it), and the lines left without the guards.

    python3 tools/file_shape.py [path/to/train_gpt.py]

Run it on an older version with `git show REV:train_gpt.py > /tmp/old.py; python3 tools/file_shape.py /tmp/old.py`
(a capability whose definitions that version lacks is reported as such, not counted).
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

# What the script keeps beyond the training recipe itself: each capability, by its top-level definitions, and
# whether a preset or score integrity needs it ("needs") or it is a guard the project's standards or an earlier
# issue asked for ("guard": one-line errors, outputs never lost, checks at start)
CAPABILITIES = {
    "settings validation (ranges, choices, combinations)":
        ("guard", "RANGES CHOICES in_interval validate field_checks combination_checks technique_checks"),
    "misspelt / removed setting stop": ("guard", "REMOVED_SETTINGS _KNOB_PREFIXES _FOREIGN_PREFIXES _ALIASES "
                                                 "resembled_setting"),
    "SCALE=toy": ("guard", "TOY RECORD_TOKENS toy_settings"),
    "validation text proof, CaseOps decode":
        ("needs", "first_disagreement check_validation_text caseops_decode _CASEOPS_DECODE CASEOPS_OPERATORS "
                  "REENCODE_DOCS"),
    "official split naming": ("guard", "OFFICIAL_SPLITS split_name"),
    "data manifest check": ("guard", "check_manifest"),
    "leak check": ("needs", "document_digests leak_counts check_leak LEAK_MIN_TOKENS LEAK_BLOCK_TOKENS"),
    "training budget line": ("guard", "log_train_budget"),
    "attention kernels (FA3/FA4, pins, report)": ("guard", "SDPA_KERNELS OPTIONAL_KERNELS ATTN_BACKENDS "
                                                           "select_sdpa_kernels optional_kernel "
                                                           "attention_kernel_report check_pinned_kernel"),
    "TTT budget (sp8192's evaluation within 600 s)": ("needs", "TTTBudget batch_work"),
    "eval plan line": ("guard", "RECORD_RATES eval_plan"),
    "compile guards": ("guard", "compiled_graphs maybe_compile compiled_graphs_only"),
    "divergence stop": ("guard", "first_nonfinite agreed_clock"),
    "outputs never lost (claiming, room, set-aside)": ("guard", "LOG_ROOM_BYTES check_room check_new_output "
                                                                "claim_files claim_outputs set_aside_if_not_started "
                                                                "write_atomically"),
    "artifact damage handling": ("guard", "unpack_frames decompress_frame payload_bytes deserialize_artifact "
                                          "brotli_decode load_artifact load_weights ARTIFACT_MAX_HEADER_BYTES "
                                          "ARTIFACT_MAX_PAYLOAD_BYTES"),
    "ANS coder (COMPRESSOR=ans, sp8192)": ("needs", "ans_encode ans_decode ans_groups ans_model ANS_COLUMN_BUCKETS"),
    "AWQ-lite (no preset; PR #1945)": ("needs", "salient_groups awq_columns awq_scale AWQ_PARTS AWQ_WIDTH"),
    "progressive context (no preset; PR #2014)": ("needs", "seq_schedule seq_len_at"),
    "Muon WD taper (no preset; PR #1729)": ("needs", "muon_wd_scale"),
    "shipped form (code_bytes)": ("needs", "SHIPPED_HEAD SHIPPED_TAIL minified shipped_form readable_source"),
}


def sections(lines: list[str]) -> list[tuple[str, int, float]]:
    """(name, lines, KB) per `# ---` banner section, the header and imports first."""
    marks = [i for i, line in enumerate(lines) if line.startswith("# ----") and i + 1 < len(lines)
             and lines[i + 1].startswith("# ")]
    bounds = [(0, "header+imports")] + [(i, lines[i + 1][2:]) for i in marks] + [(len(lines), "")]
    return [(name, b - a, len("\n".join(lines[a:b]).encode()) / 1024)
            for (a, name), (b, _) in zip(bounds, bounds[1:])]


def line_kinds(tree: ast.Module, lines: list[str]) -> dict[str, int]:
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node) is not None:
            docstrings.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    blank = sum(not line.strip() for line in lines)
    comment = sum(line.strip().startswith("#") for i, line in enumerate(lines, 1) if i not in docstrings)
    return dict(code=len(lines) - blank - len(docstrings) - comment, blank=blank, docstring=len(docstrings),
                comment=comment)


def definition_lines(tree: ast.Module) -> dict[str, int]:
    """Lines per top-level name (a def, class or assignment with its decorators, plus one blank line)."""
    size = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
        else:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        size.update(dict.fromkeys(names, node.end_lineno - start + 2))
    return size


def joinable_lines(source: str, width: int = 120) -> tuple[int, int]:
    """(continuation lines of code statements, those that joining a statement onto one line of at most `width`
    columns would save): how much of the line count is layout rather than code. Statements holding a comment or
    a multi-line string are left out."""
    lines, continued, saved, statement = source.splitlines(), 0, 0, []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        skip = (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)
        if token.type in skip and not statement:
            continue
        statement.append(token)
        if token.type != tokenize.NEWLINE:
            continue
        first, last = statement[0].start[0], statement[-1].start[0]
        plain = not any(t.type == tokenize.COMMENT or (t.type == tokenize.STRING and t.start[0] != t.end[0])
                        for t in statement)
        if last > first and plain:
            continued += last - first
            indent = len(lines[first - 1]) - len(lines[first - 1].lstrip())
            joined = " ".join(line.strip() for line in lines[first - 1:last])
            saved += (last - first) * (indent + len(joined) <= width)
        statement = []
    return continued, saved


def main(path: str) -> None:
    source = Path(path).read_text(encoding="utf-8")
    lines, tree = source.splitlines(), ast.parse(source)
    print(f"{path}: {len(lines)} lines, {len(source.encode())} bytes, {len(source.split())} words")
    for name, count, kb in sections(lines):
        print(f"  {name:42s} {count:5d} lines {kb:6.1f} KB")
    print("  kinds of lines: " + ", ".join(f"{k} {v}" for k, v in line_kinds(tree, lines).items()))
    continued, saved = joinable_lines(source)
    print(f"  continuation lines of code statements: {continued}; joining within 120 columns would save {saved}")
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    longest = sorted(functions, key=lambda n: n.lineno - n.end_lineno)[:3]
    print(f"  functions {len(functions)}; longest " + ", ".join(f"{n.name} {n.end_lineno - n.lineno + 1}"
                                                                for n in longest))
    many = [n.name for n in functions if len(n.args.args) + len(n.args.kwonlyargs) >= 7]
    print(f"  with 7+ parameters (self counted): {len(many)}: {' '.join(many)}")
    size, totals = definition_lines(tree), {"guard": 0, "needs": 0}
    print("  capabilities beyond the recipe (lines of their top-level definitions; guard or needed):")
    for capability, (kind, names) in CAPABILITIES.items():
        missing = [n for n in names.split() if n not in size]
        if missing:
            print(f"  {'-':>5}  {capability}: not in this version ({' '.join(missing)})")
            continue
        lines_taken = sum(size[n] for n in names.split())
        totals[kind] += lines_taken
        print(f"  {lines_taken:5d}  {kind}  {capability}")
    print(f"  {sum(totals.values()):5d}  in all: guards {totals['guard']}, needed by a preset or score integrity "
          f"{totals['needs']}")
    print(f"  without any guard (their call sites not counted): {len(lines) - totals['guard']} lines")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent.parent / "train_gpt.py"))
