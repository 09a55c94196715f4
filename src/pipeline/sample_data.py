"""Sample data that needs no download: text that this machine's Debian packages ship.

`/usr/share/doc/*/copyright` and `/usr/share/common-licenses/*` are real English prose
with many natural near-duplicates (the same licence pasted into hundreds of packages,
with small edits), which is exactly what curation has to handle.
"""

from __future__ import annotations

import io
import json
import random
import re
import uuid
from pathlib import Path

DOC_ROOTS = ("/usr/share/doc", "/usr/share/common-licenses")
MAX_FILE_BYTES = 200_000  # a few multi-MB boost files repeat one text; skip them
DOC_CHARS = 1500  # paragraphs are merged into documents of about this size
CRAWL_DATE = "2026-01-01T00:00:00Z"  # every record of the sample crawl, so that each build holds the same records


def source_files() -> list[Path]:
    files = sorted(Path(DOC_ROOTS[0]).glob("*/copyright"))
    files += sorted(p for p in Path(DOC_ROOTS[1]).glob("*") if p.is_file())
    return [p for p in files if p.stat().st_size <= MAX_FILE_BYTES]


def split_documents(text: str, target_chars: int = DOC_CHARS) -> list[str]:
    """Merge blank-line separated paragraphs into documents of about `target_chars`."""
    docs, current = [], ""
    for para in re.split(r"\n\s*\n", text):
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= target_chars:
            docs.append(current.strip())
            current = ""
    if current.strip():
        docs.append(current.strip())
    return docs


def build_corpus(out_dir: str | Path, max_bytes: int = 4_000_000, shards: int = 4) -> list[Path]:
    """Write the demo corpus as `shards` jsonl files; returns their paths. Deterministic."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, size = [], 0
    for path in source_files():
        name = path.parent.name if path.name == "copyright" else f"license-{path.name}"
        text = path.read_text(encoding="utf-8", errors="replace")
        for i, doc in enumerate(split_documents(text)):
            records.append({"id": f"{name}/{i}", "text": doc, "source": str(path)})
            size += len(doc.encode())
        if size >= max_bytes:
            break
    paths = [out / f"part-{k:02d}.jsonl" for k in range(shards)]
    handles = [p.open("w", encoding="utf-8") for p in paths]
    for n, rec in enumerate(records):
        handles[n % shards].write(json.dumps(rec) + "\n")
    for h in handles:
        h.close()
    return paths


FIELD = re.compile(r"^(Upstream-Name|Source|License|Copyright|Files):\s*(.+)$", re.M)
# a stand-alone licence paragraph: "License: NAME" followed by its indented text
LICENSE_BODY = re.compile(r"^License:\s*(\S[^\n]*)\n((?:[ \t]+\S[^\n]*\n?){3,})", re.M)


def near_duplicate_variants(docs: list[dict], rates: tuple[float, ...], share: float, seed: int = 0) -> list[dict]:
    """Edited copies of a `share` of the documents, one per word-replacement rate: a rate of 0.01
    keeps Jaccard (5-word shingles) near 0.95, one of 0.1 takes it near 0.35. Copies carry
    `variant_of` and `rate` so evaluations can tell planted from natural duplicates."""
    rng = random.Random(seed)
    out = []
    for doc in rng.sample(docs, int(len(docs) * share)):
        words = doc["text"].split()
        for rate in rates:
            edited = [w if rng.random() >= rate else f"edit{rng.randrange(10**6)}" for w in words]
            out.append({"id": f"{doc['id']}~{rate}", "text": " ".join(edited), "variant_of": doc["id"], "rate": rate})
    return out


def _copyright_fields(text: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for key, value in FIELD.findall(text):
        fields.setdefault(key, []).append(value.strip())
    return fields


def instruction_pairs(limit: int = 400, seed: int = 0) -> list[dict]:
    """Derive [TASK]/[INPUT]/[OUTPUT] pairs from machine-readable Debian copyright files."""
    pairs = []
    for path in sorted(Path(DOC_ROOTS[0]).glob("*/copyright")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.startswith("Format:") or len(text) > MAX_FILE_BYTES:
            continue
        f, package = _copyright_fields(text), path.parent.name
        header = text[:400]
        if f.get("Upstream-Name"):
            pairs.append(("upstream-name", header, f["Upstream-Name"][0]))
        for name, body in LICENSE_BODY.findall(text)[:2]:
            pairs.append(("license", " ".join(body.split())[:300], name.strip()))
        if f.get("License"):
            pairs.append(("license-count", f"package {package}", str(len(set(f["License"])))))
        if f.get("Copyright"):
            pairs.append(("copyright-holder", f"package {package}", f["Copyright"][0]))
    random.Random(seed).shuffle(pairs)
    return [{"task": t, "input": i, "output": o} for t, i, o in pairs[:limit]]


def write_instructions(path: str | Path, limit: int = 400) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in instruction_pairs(limit):
            fh.write(json.dumps(rec) + "\n")
    return path


def preference_pairs(instructions: list[dict], seed: int = 0) -> list[dict]:
    """DPO pairs from instruction pairs: the right answer is chosen, another record's answer to the
    same task is rejected (plausible in form, wrong in content)."""
    from pipeline.multitask import format_instruction

    rng = random.Random(seed)
    by_task: dict[str, list[str]] = {}
    for rec in instructions:
        by_task.setdefault(rec["task"], []).append(rec["output"])
    pairs = []
    for rec in instructions:
        wrong = [o for o in by_task[rec["task"]] if o != rec["output"]]
        if wrong:
            pairs.append(
                {
                    "prompt": format_instruction(rec["task"], rec["input"]),
                    "chosen": rec["output"],
                    "rejected": rng.choice(wrong),
                }
            )
    return pairs


def write_preferences(path: str | Path, instructions: str | Path) -> Path:
    path = Path(path)
    records = [json.loads(line) for line in Path(instructions).read_text().splitlines() if line.strip()]
    with path.open("w", encoding="utf-8") as fh:
        for rec in preference_pairs(records):
            fh.write(json.dumps(rec) + "\n")
    return path


def write_warc(path: str | Path, responses: list[tuple[str, str, str, bytes]]) -> Path:
    """A gzip WARC as a crawler writes it: a warcinfo record, then for each (url, status, content type, body)
    the request and its response. Record ids and dates derive from the URL, so every build holds the same records."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    def headers(url: str, kind: str) -> dict:
        return {"WARC-Record-ID": f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, kind + url)}>", "WARC-Date": CRAWL_DATE}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        info = b"software: pipeline sample-data\r\nformat: WARC File Format 1.1\r\n"
        writer.write_record(
            writer.create_warc_record(
                "",
                "warcinfo",
                payload=io.BytesIO(info),
                warc_content_type="application/warc-fields",
                warc_headers_dict={**headers(path.name, "i"), "WARC-Filename": path.name},
            )
        )
        for url, status, content_type, body in responses:
            request = StatusAndHeaders(f"GET {url} HTTP/1.1", [("Host", url.split("/")[2])], is_http_request=True)
            writer.write_record(
                writer.create_warc_record(url, "request", http_headers=request, warc_headers_dict=headers(url, "q"))
            )
            reply = StatusAndHeaders(status, [("Content-Type", content_type)], protocol="HTTP/1.1")
            writer.write_record(
                writer.create_warc_record(
                    url, "response", payload=io.BytesIO(body), http_headers=reply, warc_headers_dict=headers(url, "r")
                )
            )
    return path


def html_pages(limit: int) -> list[Path]:
    """The HTML documentation this machine's packages ship (release notes, manuals, FAQs)."""
    found = sorted(
        p
        for p in Path(DOC_ROOTS[0]).rglob("*.htm*")
        if p.suffix in (".html", ".htm") and p.is_file() and p.stat().st_size <= MAX_FILE_BYTES
    )
    return found[:limit]


def build_crawl(path: str | Path, pages: int = 60) -> Path:
    """A small web crawl of this machine's HTML pages, with what real crawls also hold: request and warcinfo
    records, an image and a page that was not found, each to be rejected with its reason."""
    import matplotlib

    site = "http://docs.example"
    responses = [
        (f"{site}/{p.relative_to(DOC_ROOTS[0])}", "200 OK", "text/html; charset=utf-8", p.read_bytes())
        for p in html_pages(pages)
    ]
    image = Path(matplotlib.get_data_path()) / "images" / "home.png"
    responses += [
        (f"{site}/logo.png", "200 OK", "image/png", image.read_bytes()),
        (f"{site}/moved.html", "404 Not Found", "text/html", b"<html><body><h1>Not Found</h1></body></html>"),
    ]
    return write_warc(path, responses)
