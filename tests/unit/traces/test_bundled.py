"""The bundled traces are the published files, byte for byte, and load."""

from __future__ import annotations

import gzip
import hashlib
import warnings

import pytest

from traces.bundled import BUNDLED, DATA_DIR, bundled_path
from traces.errors import TraceError
from traces.loaders import load

# sha256 of the upstream files (traces/data/README.md lists their origin).
UPSTREAM_SHA256 = {
    "azure-llm-2023/AzureLLMInferenceTrace_code.csv.gz": "54e9a6d2a4bd06ba1e060304b900abbc74cbea53de96506e60fe5bb4f2277fb6",
    "azure-llm-2023/AzureLLMInferenceTrace_conv.csv.gz": "2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8",
    "mooncake-fast25/conversation_trace.jsonl.gz": "b8cbb061a85206d729d91cdc2981f43c9e0d99209dce588d3af5f7934408b9df",
    "mooncake-fast25/synthetic_trace.jsonl.gz": "bd070915a98fc0ed264d7cfef2ce746002eb3076a695ec31ba2674c0111ec131",
    "ragpulse/0_trace.jsonl.gz": "cd371571bef3320907147f8901729e37f412aafb067ec8eb153e2828e1801e65",
    "ragpulse/1_sys_prompt.jsonl.gz": "e7bf9bc66493629fa279d67ffb9d6a44e4ec3a7ac60549f5c679319c54564f6d",
    "ragpulse/2_passages.jsonl.gz": "8575941cab2eb1cae25e589b7fab3ccb6affc3809e4156b1dc6db40d9e65b891",
    "ragpulse/3_history.jsonl.gz": "fdd9b1ca962c2b4d0f48785497007e20aa961442eb93cb1afbe3f23c383ae467",
    "ragpulse/4_user_input.jsonl.gz": "5adeff33a44850f5a1c0892aaaf7000114d7ac24821d4238175abb92b77dd12d",
    "ragpulse/5_web_search.jsonl.gz": "5e4cba4e2e449eb1a26c1c94aa57a59204f29c8ed0395da03cf0f43b7d75891c",
}


@pytest.mark.parametrize("relpath", sorted(UPSTREAM_SHA256))
def test_bundled_file_is_the_upstream_file(relpath: str) -> None:
    data = gzip.decompress((DATA_DIR / relpath).read_bytes())
    assert hashlib.sha256(data).hexdigest() == UPSTREAM_SHA256[relpath]


@pytest.mark.parametrize("folder", ["azure-llm-2023", "mooncake-fast25", "ragpulse"])
def test_each_bundled_source_carries_its_license(folder: str) -> None:
    licenses = list((DATA_DIR / folder).glob("LICENSE*"))
    assert licenses and all(p.stat().st_size > 500 for p in licenses)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_every_bundled_trace_loads(name: str) -> None:
    trace = load(bundled_path(name))
    assert len(trace) > 1000
    assert trace.arrival_s[0] == 0.0


def test_unknown_bundled_name_lists_the_known_ones() -> None:
    with pytest.raises(TraceError, match="azure-code"):
        bundled_path("azure")


def test_load_reads_a_bundled_name_and_names_the_trace_after_it() -> None:
    trace = load("bundled:azure-code")
    assert trace.name == "azure-code"
    assert trace.equals(load(bundled_path("azure-code")))
    with pytest.raises(TraceError, match="no bundled trace named 'azure'; known: azure-code"):
        load("bundled:azure")


def test_a_bundled_trace_is_sorted_without_a_warning(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bundled = load("bundled:ragpulse", prefix=False)
    assert (bundled.arrival_s[1:] >= bundled.arrival_s[:-1]).all()
    copy = tmp_path / "0_trace.jsonl.gz"
    copy.write_bytes(bundled_path("ragpulse").read_bytes())
    with pytest.warns(UserWarning, match="1 pair"):
        load(copy, prefix=False)
