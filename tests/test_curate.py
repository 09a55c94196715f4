"""The curate stage on a real sample of licence text, with planted bad and duplicate records, on a
local Ray (the rules alone, without Ray: test_curate_rules.py)."""

import json
from collections import Counter

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import PEOPLE, WIKI, crawl_responses, site_page, tiny_config
from pipeline.curate.stage import run_curate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def curated(ray_local, tiny_corpus, tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("runs"), tiny_corpus)
    stats = run_curate(cfg)
    out = cfg.stage_dir("curate")
    kept = pq.read_table(out / "kept").to_pandas()
    rejected = pq.read_table(out / "rejected").to_pandas().set_index("id")
    return stats, kept, rejected, out


def input_lines(corpus) -> int:
    return sum(1 for f in corpus.glob("*.jsonl") for line in f.read_bytes().splitlines() if line.strip())


def test_nothing_is_lost(curated, tiny_corpus):
    stats, kept, rejected, _ = curated
    assert stats["docs_in"] == input_lines(tiny_corpus)
    assert len(kept) + len(rejected) == stats["docs_in"]
    assert stats["kept"] == len(kept) and stats["rejected"] == len(rejected)
    assert not set(kept["id"]) & set(rejected.index)


def test_bad_records_are_rejected_with_reasons(curated):
    _, _, rejected, _ = curated
    assert rejected.loc["planted-short", "reason"].startswith("too short")
    assert rejected.loc["planted-empty", "reason"] == "empty text"
    assert rejected.loc["planted-notext", "reason"] == "missing text field 'text'"
    bad_json = rejected[rejected["reason"].str.startswith("malformed json")]
    assert len(bad_json) == 1 and '"planted-bad-json"' in bad_json.iloc[0]["raw"]
    bad_utf8 = rejected[rejected["reason"] == "invalid utf-8"]
    assert len(bad_utf8) == 1 and "planted-bad-utf8" in bad_utf8.iloc[0]["raw"]


def test_exact_and_near_duplicates_point_to_a_kept_survivor(curated):
    _, kept, rejected, _ = curated
    assert rejected.loc["planted-exact-copy", "reason"] == "exact duplicate"
    assert rejected.loc["planted-near-copy", "reason"] == "near duplicate"
    dups = rejected[rejected["reason"].str.endswith("duplicate")]
    assert len(dups) > 10  # licence texts repeat across packages
    assert set(dups["duplicate_of"]) <= set(kept["id"])
    assert kept["text"].is_unique
    # rejected/ carries the Jaccard to duplicate_of: 1 for an exact copy, unless it points on past a near duplicate
    assert (dups["jaccard"] >= 0.8).all() and (dups.loc[dups["reason"] == "exact duplicate", "jaccard"] == 1.0).any()


def test_stats_file_counts_per_reason(curated):
    stats, _, _, out = curated
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == stats
    assert sum(stats["by_reason"].values()) == stats["docs_in"]
    assert stats["by_reason"]["exact duplicate"] >= 1 and stats["by_reason"]["near duplicate"] >= 1
    assert stats["docs_per_s"] > 0
    fuzzy = stats["fuzzy_dedup"]
    assert fuzzy["survivors"] == "greedy" and fuzzy["removed"] == stats["by_reason"]["near duplicate"]
    assert fuzzy["removed_without_kept_neighbour"] == 0 and fuzzy["component_size_max"] >= 2


MIRROR = "http://mirror.example/a0.html"


def test_a_crawl_is_curated_page_by_page_whatever_its_files(ray_local, tiny_corpus, tmp_path):
    """A WARC through the whole chain: pages extracted on Ray, the German page dropped by the language filter,
    the mirrored page (its own notice on top) removed as a near duplicate of the original; the same crawl cut
    into three files gives the same ids, kept and rejected."""
    from pipeline.sample_data import write_warc

    responses = crawl_responses(articles=8)
    write_warc(tmp_path / "one" / "crawl.warc.gz", responses)
    for k in range(3):
        write_warc(tmp_path / "three" / f"crawl-{k}.warc.gz", responses[k::3])
    outcomes = []
    for layout in ("one", "three"):
        cfg = tiny_config(tmp_path / f"runs-{layout}", tiny_corpus, "data.filters.languages=[en]")
        stats = run_curate(cfg, inputs=[str(tmp_path / layout)])
        kept = pq.read_table(cfg.stage_dir("curate") / "kept").to_pandas()
        rejected = pq.read_table(cfg.stage_dir("curate") / "rejected").to_pandas()
        assert stats["docs_in"] == len(kept) + len(rejected) == {"one": 1, "three": 3}[layout] + 2 * len(responses)
        pages = rejected[rejected["reason"] != "WARC warcinfo record, not a response"]  # one per file
        outcomes.append((set(kept["id"]), dict(zip(pages["id"], pages["reason"]))))
    (kept_ids, reasons), again = outcomes
    assert again == outcomes[0]
    urls = {i: json.loads(m)["url"] for i, m in zip(kept["id"], kept["meta"])}
    assert len(kept_ids) == 8 and len(set(urls.values()) & {"http://site.example/a0.html", MIRROR}) == 1
    (copy,) = rejected[rejected["reason"] == "near duplicate"].itertuples()  # the original or its mirror
    assert {json.loads(copy.meta)["url"], urls[copy.duplicate_of]} == {"http://site.example/a0.html", MIRROR}
    assert sorted(Counter(reasons.values()).items()) == [
        ("HTTP status 404", 1),
        ("WARC request record, not a response", len(responses)),
        ("language de not in en", 1),
        ("near duplicate", 1),
        ("no text extracted from HTML", 1),
        ("non-HTML response (image/png)", 1),
    ]
    assert all(json.loads(m)["language"] == "en" for m in kept["meta"])


def test_every_source_goes_through_one_curate_run(ray_local, tiny_corpus, tmp_path):
    """A dump, a table, a folder of captioned images and a folder of pages beside the jsonl corpus: one run,
    every record kept or rejected, each source's rejects under its reasons, each kept row's meta its own."""
    from PIL import Image

    (tmp_path / "wiki.xml").write_text(WIKI)
    (tmp_path / "people.csv").write_text(PEOPLE)
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (8, 8), "green").save(tmp_path / "photos" / "green.png")
    (tmp_path / "photos" / "green.txt").write_text("A green square on a white page, drawn for the test.")
    (tmp_path / "photos" / "broken.png").write_bytes(b"no image")
    (tmp_path / "photos" / "broken.txt").write_text("A caption whose image cannot be opened.")
    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / "page.html").write_bytes(site_page(["A page of the folder, with enough words to keep."]))
    cfg = tiny_config(tmp_path / "runs", tiny_corpus, "data.table.template='{name} was born in {year}.'")
    inputs = [str(tmp_path / name) for name in ("wiki.xml", "people.csv", "photos", "pages")]
    stats = run_curate(cfg, inputs=[*inputs, f"{tiny_corpus}/*.jsonl"])
    kept = pq.read_table(cfg.stage_dir("curate") / "kept").to_pandas().set_index("id")
    rejected = pq.read_table(cfg.stage_dir("curate") / "rejected").to_pandas().set_index("id")
    assert stats["docs_in"] == 5 + 4 + 2 + 1 + input_lines(tiny_corpus) == len(kept) + len(rejected)
    assert json.loads(kept.loc["testwiki:7", "meta"])["title"] == "Ada Lovelace"
    assert kept.loc[f"{tmp_path}/people.csv:0", "text"] == "Ada Lovelace was born in 1815."
    assert json.loads(kept.loc[f"{tmp_path}/photos/green.png", "meta"])["image"]["width"] == 8
    assert kept.loc[f"{tmp_path}/pages/page.html", "text"] == "A page of the folder, with enough words to keep."
    assert rejected.loc["testwiki:8", "reason"] == "redirect to Ada Lovelace"
    assert rejected.loc[f"{tmp_path}/people.csv:line5", "reason"].startswith("malformed CSV line")
    assert rejected.loc[f"{tmp_path}/people.csv:2", "reason"] == "row has no value for year (data.table.template)"
    assert rejected.loc[f"{tmp_path}/photos/broken.png", "reason"].startswith("unreadable image")


def _fuzzy_input(tiny_corpus) -> pd.DataFrame:
    """The tiny corpus (licence texts with natural near-duplicates) plus planted edited copies:
    1 in 200 words replaced (Jaccard ~0.95), 1 in 100 (~0.9), 1 in 50 (~0.82, just above 0.8),
    3 in 100 (~0.74, just below) and 1 in 10 (~0.35, far below)."""
    from pipeline.sample_data import near_duplicate_variants

    lines = [line for f in sorted(tiny_corpus.glob("*.jsonl")) for line in f.read_bytes().splitlines()]
    docs = [json.loads(line) for line in lines if b"planted" not in line]  # the planted records are malformed
    docs = [d for d in docs if len(d["text"].split()) >= 5]
    docs += near_duplicate_variants(docs, rates=(0.005, 0.01, 0.02, 0.03, 0.1), share=0.2, seed=3)
    df = pd.DataFrame({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs]})
    df = df.drop_duplicates("text")  # exact copies are exact dedup's job, which runs first
    return df.assign(source="", raw="", reason="", step="", duplicate_of="")


def _near_duplicates(df, input_blocks: int, survivors: str = "greedy", report: dict | None = None) -> dict:
    """removed id -> (duplicate_of, Jaccard)"""
    import ray

    from pipeline.config import DedupConfig
    from pipeline.curate.dedup_fuzzy import fuzzy_dedup

    ds = ray.data.from_pandas(df).repartition(input_blocks)
    marked, figures = fuzzy_dedup(ds, DedupConfig(survivors=survivors))  # threshold 0.8, 128 slots, 5-word shingles
    (report if report is not None else {}).update(figures)
    near = marked.to_pandas().query("reason == 'near duplicate'")
    return dict(zip(near["id"], zip(near["duplicate_of"], near["jaccard"])))


def test_fuzzy_dedup_matches_exact_jaccard(ray_local, tiny_corpus):
    """Ground truth: every pair with exact 5-gram Jaccard >= 0.8 (prefix-filtered similarity join).
    precision = removed documents that truly have such a twin / removed documents;
    recall = true pairs with at most one document left / true pairs."""
    from pipeline.curate.jaccard import dedup_quality, similar_pairs

    df = _fuzzy_input(tiny_corpus)
    truth = similar_pairs(df["id"].tolist(), df["text"].tolist(), ngram=5, threshold=0.8)
    removed = _near_duplicates(df, input_blocks=3)
    quality = dedup_quality(truth, set(removed))
    assert quality["true_pairs"] > 100, quality  # natural and planted duplicates, some near the threshold
    assert quality["precision"] >= 0.99 and quality["recall"] >= 0.99, quality
    kept = set(df["id"]) - set(removed)
    assert {survivor for survivor, _ in removed.values()} <= kept  # every duplicate points at a kept document


def test_every_removed_document_has_a_kept_near_duplicate(ray_local, tiny_corpus):
    """Greedy survivors: each removed document's duplicate_of is kept and similar (its recorded Jaccard
    is the exact one, >= the threshold); components chain, so the old rule loses some documents."""
    from pipeline.curate.jaccard import jaccard, shingle_sets

    df = _fuzzy_input(tiny_corpus)
    sets = dict(zip(df["id"], shingle_sets(df["text"].tolist(), ngram=5)))
    report = {}
    removed = _near_duplicates(df, input_blocks=3, report=report)
    kept = set(df["id"]) - set(removed)
    for doc, (survivor, similarity) in removed.items():
        assert survivor in kept and similarity >= 0.8
        assert similarity == pytest.approx(jaccard(sets[doc], sets[survivor]), abs=1e-3), doc  # 32-bit fingerprints
    assert report["removed_without_kept_neighbour"] == 0 and report["removed"] == len(removed)
    old = {}
    old_removed = _near_duplicates(df, input_blocks=3, survivors="component", report=old)
    print(
        f"\nFIGURE fuzzy dedup survivors: greedy removes {len(removed)}, all with a kept near duplicate; the "
        f"component rule removes {len(old_removed)}, {old['removed_without_kept_neighbour']} without one "
        f"(largest component {report['component_size_max']})"
    )
    assert len(old_removed) >= len(removed)


def test_fuzzy_dedup_is_the_same_whatever_the_block_count(ray_local, tiny_corpus):
    df = _fuzzy_input(tiny_corpus)
    first = _near_duplicates(df, input_blocks=1)
    assert first == _near_duplicates(df, input_blocks=5) == _near_duplicates(df, input_blocks=7)  # ids and Jaccards
    assert len(first) > 50


def test_dedup_with_nothing_to_compare(ray_local):
    import ray

    from pipeline.config import DedupConfig
    from pipeline.curate.dedup_exact import exact_dedup
    from pipeline.curate.dedup_fuzzy import fuzzy_dedup
    from pipeline.curate.records import record, table

    text = "the same five words here"
    df = pd.DataFrame(
        {
            "id": ["a", "b"],
            "text": [text, text],
            "reason": ["too short", "too short"],
            "step": "filters",
            "source": "",
            "raw": "",
            "duplicate_of": "",
        }
    )

    def near(marked) -> int:
        return int((marked.to_pandas().get("reason", pd.Series(dtype=str)) == "near duplicate").sum())

    marked, _ = fuzzy_dedup(ray.data.from_pandas(df), DedupConfig())  # every row already rejected
    assert near(marked) == 0 and marked.to_pandas()["reason"].tolist() == ["too short", "too short"]
    marked, figures = fuzzy_dedup(ray.data.from_pandas(df.iloc[:0]), DedupConfig())
    assert near(marked) == 0 and marked.count() == 0 and figures["removed"] == 0

    rejected = table([record(i, text=text, reason="too short", step="filters") for i in ("a", "b")])
    marked = exact_dedup(ray.data.from_arrow(rejected)).to_pandas()
    assert marked["reason"].tolist() == ["too short", "too short"] and "digest_high" not in marked
    assert exact_dedup(ray.data.from_arrow(table([]))).count() == 0


def test_account_counts_every_record_and_refuses_a_loss(ray_local):
    """run_curate accounts before it writes kept/ and rejected/, so a loss stops it with nothing written."""
    import ray

    from pipeline.curate.records import record, table
    from pipeline.curate.stage import ConservationError, account

    rows = [record("a", text="one two three"), record("b", text="four five", reason="too short", step="filters")]
    ds = ray.data.from_arrow(table(rows))
    kept, rejected, augmented, histograms = account(ds, n_in=2)
    assert (kept, rejected, augmented) == (1, {("filters", "too short"): 1}, 0)
    assert histograms["words"].sum() == 1 and histograms["perplexity"].sum() == 0  # the kept one, never scored
    with pytest.raises(ConservationError, match="3 records in, but 1 kept"):
        account(ds, n_in=3)


def copies_in_blocks(texts: list[str], blocks: int):
    """One record per text (ids c00, c01, ...), spread over `blocks` input blocks."""
    import ray

    from pipeline.curate.records import record, table

    rows = [record(f"c{i:02}", text=text) for i, text in enumerate(texts)]
    return ray.data.from_arrow([table(rows[b::blocks]) for b in range(blocks)])


@pytest.mark.parametrize("shuffle", ["SORT_SHUFFLE_PULL_BASED", "SHUFFLE_V2"])  # init_ray's, and Ray Data's default
def test_dedup_keeps_one_of_many_copies_when_the_dataset_is_small(ray_local, shuffle):
    """A dataset smaller than one sort range, whichever shuffle the driver's Ray Data runs: the sorts still
    get a boundary of ours, which cuts by the first key only. Given none, Ray Data samples boundaries over
    every sort key, which cut a text's copies (or a bucket, or a component) between blocks by id, and each
    block kept a copy of its own: a node lost while curating the tiny corpus (in a driver on Ray Data's
    default shuffle) turned an exact duplicate into a near one this way."""
    import ray

    from pipeline.config import DedupConfig
    from pipeline.curate.dedup_exact import exact_dedup
    from pipeline.curate.dedup_fuzzy import fuzzy_dedup

    context = ray.data.DataContext.get_current()
    before, context.shuffle_strategy = context.shuffle_strategy, ray.data.context.ShuffleStrategy[shuffle]
    try:
        text = " ".join(f"word{i}" for i in range(120))
        exact = exact_dedup(copies_in_blocks([text] * 40, blocks=4)).to_pandas()
        edited = [text.replace(f"word{i} ", f"edit{i} ") for i in range(0, 120, 3)]  # pairwise Jaccard ~0.9
        near = fuzzy_dedup(copies_in_blocks(edited, blocks=4), DedupConfig())[0].to_pandas()
    finally:
        context.shuffle_strategy = before
    assert (exact["reason"] == "").sum() == 1 and set(exact["duplicate_of"]) == {"", "c00"}
    assert (near["reason"] == "").sum() == 1 and set(near["duplicate_of"]) == {"", "c00"}, near["duplicate_of"]


def test_curate_options_perplexity_metadata_shards_and_plot(ray_local, tiny_run, tmp_path):
    """The perplexity filter (actor pool, reference LM = the tiny run's merged model) drops
    gibberish and keeps licence text; keep_fields/rename carry metadata; shards follow shard_mb."""
    import random

    import pyarrow.parquet as pq

    from pipeline.curate.perplexity import PerplexityScorer

    model = tiny_run.stage_dir("quantize") / "merged"
    # the first 40 by id: kept/'s row order follows curate's hash sorts, and so would the sample
    kept = pq.read_table(tiny_run.stage_dir("curate") / "kept").to_pandas().sort_values("id")
    real = kept["text"].tolist()[:40]
    rng = random.Random(0)
    gibberish = [" ".join("".join(rng.choice("ÆØÅßþðæœ") for _ in range(7)) for _ in range(60)) for _ in range(10)]
    scorer = PerplexityScorer(str(model), trust_remote_code=False, max_tokens=64, max_perplexity=1e9)
    real_ppl, junk_ppl = scorer.perplexities(real), scorer.perplexities(gibberish)
    threshold = float((real_ppl.max() * junk_ppl.min()) ** 0.5)  # between the two populations
    assert real_ppl.max() < threshold < junk_ppl.min()

    src = tmp_path / "in.jsonl"
    with src.open("w") as fh:
        for i, text in enumerate(real + gibberish):
            fh.write(json.dumps({"id": f"d{i:03d}", "body": text, "lang": "en", "junk": 1}) + "\n")
    cfg = tiny_config(
        tmp_path / "runs",
        tmp_path,
        "data.text_field=body",
        "data.keep_fields=[lang]",
        "data.rename={lang: language}",
        f"data.perplexity.model_path={model}",
        f"data.perplexity.max_perplexity={threshold}",
        "data.perplexity.max_tokens=64",
        "data.perplexity.concurrency=2",
        "data.shard_mb=0.01",
        "data.dedup.fuzzy=false",
        "data.filters.min_words=0",
    )
    stats = run_curate(cfg)
    out = cfg.stage_dir("curate")
    kept = pq.read_table(out / "kept").to_pandas()
    rejected = pq.read_table(out / "rejected").to_pandas()
    dropped = rejected[rejected["reason"].str.startswith("perplexity")]
    assert len(dropped) == 10 and set(dropped["id"]) == {f"d{i:03d}" for i in range(40, 50)}
    assert (kept["perplexity"] < threshold).all()
    assert sum(stats["by_step"]["perplexity"].values()) == 10
    assert set(kept["meta"]) == {'{"language": "en"}'}  # `junk` dropped, `lang` renamed
    assert stats["shards"] > 1 and len(list((out / "kept").glob("*.parquet"))) == stats["shards"]
    assert (out / "histograms.png").stat().st_size > 5000


def _tiny_models(root, texts):
    """Random tiny seq2seq (Bart) and fill-mask (Bert) models on a tokenizer trained here: the
    augmentation code paths run for real; what the models write is noise."""
    from transformers import BartConfig, BartForConditionalGeneration, BertConfig, BertForMaskedLM

    from pipeline.model import train_tokenizer

    tok = train_tokenizer(texts, 512)
    tok.add_special_tokens({"mask_token": "<mask>"})
    small = {
        "vocab_size": len(tok),
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    paths = []
    for name in ("en-zh", "zh-en"):
        bart = BartForConditionalGeneration(
            BartConfig(
                d_model=32,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=512,
                decoder_start_token_id=tok.bos_token_id,
                **small,
            )
        )
        # a random decoder may stop at once or emit only special tokens: make it say something
        bart.generation_config.min_new_tokens = 8
        bart.generation_config.suppress_tokens = [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id]
        bart.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(str(root / name))
    bert = BertForMaskedLM(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
        )
    )
    bert.save_pretrained(root / "fill-mask")
    tok.save_pretrained(root / "fill-mask")
    return paths, str(root / "fill-mask")


def test_augmentation_adds_rows_that_point_at_their_source(ray_local, tiny_corpus, tmp_path):
    docs = [
        json.loads(line) for line in (tiny_corpus / "part-00.jsonl").read_bytes().splitlines() if b"planted" not in line
    ][:60]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    translation, fill_mask = _tiny_models(tmp_path, [d["text"] for d in docs])
    cfg = tiny_config(
        tmp_path / "runs",
        tmp_path / "in",
        f"data.augment.back_translation_models={translation}",
        "data.augment.back_translation_share=0.3",
        f"data.augment.synonym_model={fill_mask}",
        "data.augment.synonym_share=0.3",
        "data.augment.max_tokens=32",
    )
    stats = run_curate(cfg)
    kept = pq.read_table(cfg.stage_dir("curate") / "kept").to_pandas()
    made = kept[kept["augmented_from"] != ""]
    sources = kept[kept["augmented_from"] == ""]
    assert stats["augmented"] == len(made) > 0
    assert set(made["augmented_from"]) <= set(sources["id"])
    assert made["id"].str.endswith("#bt").any() and made["id"].str.endswith("#syn").any()
    syn = made[made["id"].str.endswith("#syn")].iloc[0]
    original = sources.set_index("id").loc[syn["augmented_from"], "text"]
    assert syn["text"] != original and len(syn["text"].split()) == len(original.split())
    assert stats["kept"] - stats["augmented"] + stats["rejected"] == stats["docs_in"]
