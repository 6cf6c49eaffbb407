"""Prompt sources for --prompts: built-ins, .txt, datasets (local) and webdataset tars."""

import io
import tarfile

import pytest

from utils.prompts import ANIMALS, PromptSourceError, check_prompt_source, load_prompts, sample_prompts


def test_builtin_animals():
    prompts = load_prompts("animals")
    assert prompts == list(ANIMALS) and len(prompts) == 45 and "kangaroo" in prompts


def test_text_file_strips_blank_lines_and_duplicates(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red circle\n\n  a blue square  \na red circle\n")
    assert load_prompts(str(path)) == ["a red circle", "a blue square"]


def test_webdataset_tar_of_txt_entries(tmp_path):
    path = tmp_path / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        for key, text in [("000", "a cat"), ("001", "a dog"), ("002", "")]:
            for ext, data in (("txt", text), ("json", "{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data.encode())
                tar.addfile(info, io.BytesIO(data.encode()))
    assert load_prompts(str(path)) == ["a cat", "a dog"]


def test_local_datasets_with_prompt_column(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"caption": ["a cat", "a dog"], "other": ["x", "y"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(str(tmp_path / "ds")) == ["a cat", "a dog"]  # 'caption' found by default
    assert load_prompts(str(tmp_path / "ds"), prompt_column="other") == ["x", "y"]
    with pytest.raises(PromptSourceError, match="--prompt_column"):
        load_prompts(str(tmp_path / "ds"), prompt_column="missing")
    (tmp_path / "p.csv").write_text("prompt,n\na horse,1\na zebra,2\n")
    assert load_prompts(str(tmp_path / "p.csv")) == ["a horse", "a zebra"]


def test_checks_fail_fast_on_local_problems_but_accept_hub_ids(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(PromptSourceError, match="no prompts"):
        check_prompt_source(str(empty))
    with pytest.raises(PromptSourceError, match="does not exist"):
        check_prompt_source(str(tmp_path / "missing.txt"))



def test_hub_prompt_sets_are_accepted_online_and_refused_offline_when_not_cached(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    for source in ("someone/some-prompt-dataset", "pickapic"):
        with pytest.raises(PromptSourceError, match="not in the local cache and HF_HUB_OFFLINE is set.*local copy"):
            check_prompt_source(source)
    (tmp_path / "hub" / "datasets--someone--some-prompt-dataset" / "snapshots" / "abc").mkdir(parents=True)
    check_prompt_source("someone/some-prompt-dataset")  # cached: an offline run can read it
    (tmp_path / "datasets" / "yuvalkirstain___pickapic_v2_no_images").mkdir(parents=True)
    check_prompt_source("pickapic")  # prepared by an earlier online run
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    check_prompt_source("other/not-cached")  # online: resolved later by datasets


def test_max_prompts_keeps_the_first_distinct_prompts_of_every_source(tmp_path):
    assert load_prompts("animals", max_prompts=3) == list(ANIMALS[:3])
    text = tmp_path / "p.txt"
    text.write_text("a\na\nb\nc\nd\n")
    assert load_prompts(str(text), max_prompts=3) == ["a", "b", "c"]
    rows = ["x0", "x0", "", "x1"] + [f"x{i}" for i in range(2, 500)]
    (tmp_path / "p.csv").write_text("prompt\n" + "\n".join(rows) + "\n")
    assert load_prompts(str(tmp_path / "p.csv"), max_prompts=4) == ["x0", "x1", "x2", "x3"]
    assert len(load_prompts(str(tmp_path / "p.csv"))) == 500


def test_streaming_reads_local_files_dirs_and_saved_datasets_like_the_hub_path(tmp_path):
    """The streamed path (what `--max_prompts` uses for hub datasets) on local data: a data directory
    goes through `load_dataset(dir, streaming=True)` exactly as a hub id does."""
    import datasets

    from utils.prompts import _read_dataset_prompts

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(f'{{"caption": "c{i % 7}"}}\n' for i in range(50)))
    streamed = _read_dataset_prompts(str(tmp_path / "data"), None, "train", max_prompts=5, streaming=True)
    assert streamed == ["c0", "c1", "c2", "c3", "c4"]
    assert _read_dataset_prompts(str(tmp_path / "data"), None, "train", streaming=True) == [f"c{i}" for i in range(7)]
    assert _read_dataset_prompts(str(tmp_path / "data"), None, "train") == [f"c{i}" for i in range(7)]
    datasets.Dataset.from_dict({"text": ["t1", "t2", "t1", "t3"]}).save_to_disk(str(tmp_path / "saved"))
    assert _read_dataset_prompts(str(tmp_path / "saved"), None, "train", max_prompts=2, streaming=True) == ["t1", "t2"]
    with pytest.raises(PromptSourceError, match="no prompt column 'missing'"):
        _read_dataset_prompts(str(tmp_path / "data"), "missing", "train", streaming=True)


def test_local_data_files_without_prompts_fail_the_cheap_check(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(PromptSourceError, match="could not read prompts from .*empty.csv"):
        check_prompt_source(str(tmp_path / "empty.csv"))
    (tmp_path / "cols.csv").write_text("name,n\nx,1\n")
    with pytest.raises(PromptSourceError, match="no prompt column None.*--prompt_column"):
        check_prompt_source(str(tmp_path / "cols.csv"))
    check_prompt_source(str(tmp_path / "cols.csv"), prompt_column="name")
    (tmp_path / "blank.csv").write_text("prompt,n\n,1\n,2\n")
    with pytest.raises(PromptSourceError, match="has no prompts"):
        check_prompt_source(str(tmp_path / "blank.csv"))


def test_sample_prompts_is_a_pure_function_of_its_keys():
    prompts = [f"p{i}" for i in range(100)]
    a = sample_prompts(prompts, 8, 0, 5, 1, 0)
    assert a == sample_prompts(prompts, 8, 0, 5, 1, 0)  # a resumed run sees the same batch
    assert a != sample_prompts(prompts, 8, 0, 5, 1, 1)  # other processes see other prompts
    assert a != sample_prompts(prompts, 8, 1, 5, 1, 0)
