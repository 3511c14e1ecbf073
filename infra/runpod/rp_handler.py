"""RunPod entry point kept for existing templates: the handler lives in handler/platforms/runpod.py
(`python -m handler.platforms.runpod`, the worker image's default command)."""

from handler.platforms.runpod import handler, main, stream_handler  # noqa: F401

if __name__ == "__main__":
    main()
