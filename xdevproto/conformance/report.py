"""Report formats: a readable table, JSON, and JUnit XML for CI systems."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

from .model import Level, Outcome, Result
from .runner import Report

MARK = {Outcome.PASS: "PASS", Outcome.FAIL: "FAIL", Outcome.NA: "n/a",
        Outcome.DIVERGENCE: "DIVG", Outcome.ERROR: "ERR!"}


def render_table(report: Report, *, verbose: bool = False) -> str:
    lines = [f"vfio-user conformance, {report.mode} mode: {report.target}"
             + (f" (peer: {report.peer})" if report.peer else "")]
    width = max((len(r.check.id) for r in report.results), default=10)
    group = None
    for r in report.results:
        if r.check.group != group:
            group = r.check.group
            lines.append(f"\n[{group}]")
        lines.append(f"  {MARK[r.outcome]:4} {r.check.level.value:6} {r.check.id:{width}}  "
                     f"{r.check.title}")
        if r.outcome is not Outcome.PASS and r.message:
            lines.append(f"         {r.message}")
        if r.divergence:
            lines.append(f"         documented divergence of {report.peer}: {r.divergence}")
        if verbose and r.outcome in (Outcome.FAIL, Outcome.ERROR, Outcome.DIVERGENCE):
            lines.extend(e.render() for e in r.transcript)
    lines.append("")
    lines.append(summary(report))
    return "\n".join(lines)


def summary(report: Report) -> str:
    parts = []
    for level in Level:
        counts = {o: report.count(o, level) for o in Outcome}
        total = sum(counts.values())
        if total:
            parts.append(f"{level.value}: " + ", ".join(
                f"{n} {o.value}" for o, n in counts.items() if n))
    verdict = "FAILED (MUST)" if report.must_failures else "ok"
    return f"{len(report.results)} checks; " + "; ".join(parts) + f" -> {verdict}"


def to_json(report: Report) -> dict[str, Any]:
    return {
        "mode": report.mode, "target": report.target, "peer": report.peer,
        "summary": {level.value: {o.value: report.count(o, level) for o in Outcome}
                    for level in Level},
        "exit_status": report.exit_status,
        "results": [r.to_json() for r in report.results],
    }


def write_json(report: Report, path: str) -> None:
    with open(path, "w") as f:
        json.dump(to_json(report), f, indent=1)
        f.write("\n")


def _transcript(r: Result) -> str:
    return "\n".join(e.render(limit=4096) for e in r.transcript)


def to_junit(report: Report) -> ET.Element:
    suite = ET.Element("testsuite", name=f"vfio-user-conformance-{report.mode}",
                       tests=str(len(report.results)),
                       failures=str(sum(1 for r in report.results if r.outcome is Outcome.FAIL)),
                       errors=str(report.count(Outcome.ERROR)),
                       skipped=str(report.count(Outcome.NA) + report.count(Outcome.DIVERGENCE)))
    for r in report.results:
        case = ET.SubElement(suite, "testcase", classname=f"{report.mode}.{r.check.group}",
                             name=f"{r.check.id} [{r.check.level.value}]",
                             time=f"{r.seconds:.4f}")
        text = f"{r.check.title} ({r.check.section})"
        if r.outcome is Outcome.FAIL:
            ET.SubElement(case, "failure", message=r.message).text = _transcript(r)
        elif r.outcome is Outcome.ERROR:
            ET.SubElement(case, "error", message=r.message).text = _transcript(r)
        elif r.outcome is Outcome.NA:
            ET.SubElement(case, "skipped", message=f"not applicable: {r.message}")
        elif r.outcome is Outcome.DIVERGENCE:
            ET.SubElement(case, "skipped", message=f"documented divergence of {report.peer}: "
                          f"{r.divergence} ({r.message})").text = _transcript(r)
        ET.SubElement(case, "system-out").text = text
    return suite


def write_junit(report: Report, path: str) -> None:
    tree = ET.ElementTree(to_junit(report))
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)
