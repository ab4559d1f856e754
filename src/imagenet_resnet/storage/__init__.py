"""Where every file of the project is written and every copy to or from a store is made: the foundation the
training and data packages stand on (it imports neither).

    urls.py      files that are not on this machine: fsspec URLs (s3://, gs://, file://), checked and opened;
                 fsspec and s3fs are imported only when a URL is given; local_path, the one way a name from a
                 store (a key listed, a name in a file fetched) becomes a local path: never outside its folder
    atomic.py    the one durability rule for local files (temporary file, fsync, rename, fsync of the folder)
                 and the one-line message for a full disk
    verified.py  uploads and downloads checked by size and SHA-256 read back
    mirror.py    the run mirror (`train --mirror URL`): upload queue, lease, restore

What a crash (a kill -9, a power loss, a full disk) may cost, and what it never does:
- A half-written file never replaces a whole one: every local file written for later reading (checkpoints,
  metrics.csv, tracking.json, indexes, shards and their completeness marks, the prepared-folder switch, files
  fetched from a store) appears whole, or its previous version stays. A temporary file may be left beside it
  (.NAME.<random>.tmp, NAME.part, NAME.partial); the next run removes, ignores or continues it.
- Lines appended to logs (train.log, steps.jsonl, metrics.jsonl) are not fsynced: the newest few seconds of them
  may be lost, never what a checkpoint already covers.
- In a store, a checkpoint upload is named in checkpoints.json only after it was read back and verified, and a
  prepared folder is complete only once its manifest, uploaded last, is there; an upload cut short is retried
  (the mirror) or redone by running the same command again (prepare --out URL). The files the mirror sweeps up
  (logs, TensorBoard events) lag the run folder by up to SWEEP_SECONDS.
"""
