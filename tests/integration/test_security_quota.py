"""A key's quota counts its running jobs as well as its queued ones: claiming does not make room."""

import pytest

from db import NewJob, QuotaExceeded


def test_running_jobs_count_against_the_quota(store):
    for _ in range(2):
        store.submit(NewJob(request={}), owner="tenant", max_queued=2)
    assert len(store.claim("w", 1)) == 1  # one runs, one waits
    with pytest.raises(QuotaExceeded, match="queued or running"):
        store.submit(NewJob(request={}), owner="tenant", max_queued=2)
    store.submit(NewJob(request={}), owner="other", max_queued=2)  # another tenant is not affected
