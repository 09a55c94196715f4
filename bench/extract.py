"""HTML main-text extraction: resiliparse (what curate uses) against trafilatura, on real pages dressed as
web pages, so that what each keeps of the article and of the boilerplate can be counted.

    python bench/extract.py [--pages 200] [--out bench/results/extract-cpu2.json]

Pages: this machine's HTML documentation (/usr/share/doc). Each page's own visible text is its article;
the bench wraps its <body> in a site's chrome (a navigation bar, a sidebar of links, a cookie banner and a
footer) whose words appear nowhere else, as a crawl's pages wrap their content.
article_recall: of the article's words (as a multiset), the share the extraction kept;
boilerplate_leak: of the chrome's words, the share it kept; pages_per_s: one core, parse included.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from emit import emit  # noqa: E402

from pipeline.curate.web import decode, html_text  # noqa: E402
from pipeline.sample_data import html_pages  # noqa: E402

NAV = " ".join(f'<li><a href="/section/{w}">{w.title()} portal</a></li>' for w in ("zebra", "quokka", "marmot", "ibis"))
SIDEBAR = " ".join(f'<li><a href="/tag/{i}">Trending kestrel story {i}</a></li>' for i in range(12))
CHROME = (
    '<header><div class="logo">Gazetteer Weekly</div><nav><ul>' + NAV + "</ul></nav></header>"
    '<div class="cookie-banner">We use biscuits to remember your wombat preferences. <button>Accept</button></div>'
    "<main><article>{body}</article></main>"
    '<aside class="sidebar"><h3>Popular this week</h3><ul>' + SIDEBAR + "</ul></aside>"
    "<footer><p>Copyright Gazetteer Weekly Holdings. Imprint, privacy, narwhal careers, advertise with us.</p>"
    '<ul><li><a href="/about">About the pelican team</a></li><li><a href="/rss">RSS feeds</a></li></ul></footer>'
)
BODY = re.compile(r"<body[^>]*>(.*)</body>", re.S | re.I)
WORD = re.compile(r"\w+")


def words(text: str) -> Counter:
    return Counter(w.lower() for w in WORD.findall(text))


def dressed(html: str) -> tuple[str, Counter, Counter]:
    """The page in the site's chrome; the article's words and the chrome's words (those not in the article)."""
    body = m.group(1) if (m := BODY.search(html)) else html
    article = words(html_text_all(html))
    chrome = words(re.sub(r"<[^>]+>", " ", CHROME.replace("{body}", "")))
    page = f"<html><head><title>Gazetteer</title></head><body>{CHROME.replace('{body}', body)}</body></html>"
    return page, article, Counter({w: n for w, n in chrome.items() if w not in article})


def html_text_all(html: str) -> str:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    return extract_plain_text(HTMLTree.parse(html), main_content=False)


def score(extract, pages: list[tuple[str, Counter, Counter]]) -> dict:
    start, outputs = time.perf_counter(), [extract(page) or "" for page, _, _ in pages]
    seconds = time.perf_counter() - start
    recall = [sum((words(out) & art).values()) / max(sum(art.values()), 1) for out, (_, art, _) in zip(outputs, pages)]
    leak = [sum((words(out) & ch).values()) / max(sum(ch.values()), 1) for out, (_, _, ch) in zip(outputs, pages)]
    return {
        "pages_per_s": round(len(pages) / seconds, 1),
        "mb_per_s": round(sum(len(p.encode()) for p, _, _ in pages) / 1e6 / seconds, 2),
        "article_recall_mean": round(statistics.mean(recall), 3),
        "article_recall_median": round(statistics.median(recall), 3),
        "pages_recall_under_0.5": sum(r < 0.5 for r in recall),
        "boilerplate_leak_mean": round(statistics.mean(leak), 3),
        "empty_extractions": sum(not out.strip() for out in outputs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--out")
    args = parser.parse_args()
    import trafilatura

    pages = [dressed(decode(p.read_bytes())) for p in html_pages(args.pages)]
    result = {
        "pages": len(pages),
        "input_mb": round(sum(len(p.encode()) for p, _, _ in pages) / 1e6, 2),
        "resiliparse_main_content": score(html_text, pages),
        "trafilatura": score(lambda html: trafilatura.extract(html, include_comments=False), pages),
        "trafilatura_version": trafilatura.__version__,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
