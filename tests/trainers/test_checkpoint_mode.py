"""checkpoint.mode in a TrainingRun: async is the default; a background save failure fails the run with the
error the synchronous mode raises, and leaves no checkpoint that looks complete."""
import pytest

from flashops.storage import BucketMissingError, open_store
from flashops.trainers.runner import run_training


def test_async_is_the_default(tiny_run):
    assert tiny_run("r", "pretrain").spec.checkpoint.mode == "async"


@pytest.mark.slow
def test_async_failure_fails_the_run_like_sync(home, s3_server, s3_env, tiny_run):
    """The bucket is deleted under a running TrainingRun: in both modes the run fails with BucketMissingError
    (async: raised at a step after the save, from the background) and leaves no checkpoint behind."""
    client = s3_server.client()
    for mode in ("sync", "async"):
        bucket = s3_server.make_bucket()
        store = open_store(f"s3://{bucket}/flashops")
        store.latest("gone")  # the store has checked its bucket: it exists

        def delete_bucket(row):
            if row["step"] == 1:
                client.remove_bucket(bucket)

        run = tiny_run("gone", "pretrain", training={"steps": 4}, checkpoint={"every": 2, "mode": mode})
        with pytest.raises(BucketMissingError):
            run_training(run, store, False, on_step=delete_bucket)
