"""MediaWiki XML dumps (Wikipedia's pages-articles, .xml or .xml.bz2): each article's wikitext to plain text.

The dump is parsed as a stream, page by page, and each page is dropped from memory once it is a record, so a
dump larger than memory reads in constant memory. Wikipedia publishes its dumps split into many files
(pages-articles1.xml-p1p41242.bz2, ...); each file is one read task. Redirects and pages outside the article
namespace (talk, user, template, ...) are rejects with reasons; the title goes to `meta`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import IO
from xml.etree import ElementTree

import mwparserfromhell

from pipeline.curate.records import read_reject, record

TABLES = re.compile(r"^\{\|.*?^\|\}", re.S | re.M)  # wikitables: cells, not prose
NON_TEXT_LINK = re.compile(r"^\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)  # and interlanguage


def wikitext_to_text(wikitext: str) -> str:
    """Plain text: templates, references, tables, comments, files, categories and markup removed; a link
    becomes its label."""
    code = mwparserfromhell.parse(TABLES.sub("", wikitext))
    for link in code.filter_wikilinks(recursive=False):
        if NON_TEXT_LINK.match(str(link.title)):
            code.remove(link)
    return code.strip_code(normalize=True, collapse=True)


def _child(page: ElementTree.Element, path: str) -> str:
    return (page.findtext(path) or "").strip()


def _page_row(page: ElementTree.Element, source: str, site: str, namespaces: dict[str, str]) -> dict:
    title, ns, page_id = _child(page, "{*}title"), _child(page, "{*}ns"), _child(page, "{*}id")
    rid = f"{site or source}:{page_id or title}"
    meta = json.dumps({"title": title, "page_id": page_id, "timestamp": _child(page, "{*}revision/{*}timestamp")})
    redirect = page.find("{*}redirect")
    if redirect is not None:
        reason = f"redirect to {redirect.get('title', '?')}"
    elif ns != "0":
        reason = f"namespace {ns} ({namespaces.get(ns, 'unknown')}), not an article"
    elif not (text := wikitext_to_text(page.findtext("{*}revision/{*}text") or "")).strip():
        reason = "no text after removing wiki markup"
    else:
        return record(rid, text=text, source=source, meta=meta)
    return read_reject(rid, source, reason, raw=title, meta=meta)


def wiki_pages(stream: IO[bytes], source: str) -> Iterator[dict]:
    site, namespaces, root = "", {}, None
    for event, elem in ElementTree.iterparse(stream, events=("start", "end")):
        if root is None:
            root = elem
            if not elem.tag.endswith("mediawiki"):
                raise ElementTree.ParseError(f"not a MediaWiki dump (its root element is <{elem.tag}>)")
        if event != "end":
            continue
        tag = elem.tag.rsplit("}", 1)[-1]
        if tag == "dbname":
            site = (elem.text or "").strip()
        elif tag == "namespace":
            namespaces[elem.get("key", "")] = elem.text or "(articles)"
        elif tag == "page":
            yield _page_row(elem, source, site, namespaces)
            root.clear()  # the pages read so far: memory stays flat over the whole dump
