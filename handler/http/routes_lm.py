"""The LM's own tasks over HTTP, as the reference API server offers them (`/format_input`,
`/v1/create_sample`, `/create_random_sample`): each runs as a short job on the queue and the call
waits for its result."""

from fastapi import APIRouter

router = APIRouter()
