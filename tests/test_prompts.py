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
    check_prompt_source("someone/some-prompt-dataset")  # resolved later by datasets
    check_prompt_source("pickapic")


def test_sample_prompts_is_a_pure_function_of_its_keys():
    prompts = [f"p{i}" for i in range(100)]
    a = sample_prompts(prompts, 8, 0, 5, 1, 0)
    assert a == sample_prompts(prompts, 8, 0, 5, 1, 0)  # a resumed run sees the same batch
    assert a != sample_prompts(prompts, 8, 0, 5, 1, 1)  # other processes see other prompts
    assert a != sample_prompts(prompts, 8, 1, 5, 1, 0)
