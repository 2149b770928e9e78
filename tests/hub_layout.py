"""Hub-layout caches for offline tests: a model under models--org--name/snapshots/<sha>, and a
named dataset in the `datasets` library's prepared cache, as a download would have left them."""
import glob
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
from datasets.packaged_modules.parquet.parquet import Parquet

SHA = "0123456789abcdef0123456789abcdef01234567"


def model_cache(hf_home, repo_id, folder):
    """Lay the model folder out as the Hub client caches a download of repo_id."""
    root = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, os.path.join(root, "snapshots", SHA))
    os.makedirs(os.path.join(root, "refs"))
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(SHA)


def dataset_cache(hf_home, repo_id, config, splits, tmp):
    """Prepare repo_id/config in the datasets cache (HF_HOME/datasets) from {split: [row dict]}."""
    files = {}
    for split, rows in splits.items():
        files[split] = os.path.join(tmp, f"{split}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), files[split])
    scratch = os.path.join(tmp, "prepare")
    Parquet(cache_dir=scratch, dataset_name=repo_id.split("/")[-1], config_name=config,
            data_files=files).download_and_prepare()
    prepared = glob.glob(os.path.join(scratch, "*", "*", "0.0.0"))[0]
    target = os.path.join(hf_home, "datasets", repo_id.replace("/", "___"), config, "0.0.0", SHA[:16])
    os.makedirs(target)
    for f in os.listdir(prepared):
        if f.endswith((".arrow", ".json")):
            shutil.copy(os.path.join(prepared, f), target)
