import time
from uuid import UUID

from db.ids import new_job_id


def test_job_ids_are_uuid7_and_ordered_by_time():
    first = new_job_id()
    time.sleep(0.002)
    second = new_job_id()
    assert first.version == 7 and first.variant == "specified in RFC 4122"
    assert first < second
    assert abs((first.int >> 80) - time.time_ns() // 1_000_000) < 1000
    assert len({new_job_id() for _ in range(10000)}) == 10000
    assert UUID(str(first)) == first
