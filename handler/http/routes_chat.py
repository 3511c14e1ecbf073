"""`POST /v1/chat/completions`, OpenRouter-compatible as the reference's adapter: a chat turn becomes
a generation job on the queue; the answer carries the audio."""

from fastapi import APIRouter

router = APIRouter()
