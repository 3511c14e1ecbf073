"""The contract's domain rules are the LM's: whatever the constrained decoder may write, the API accepts."""

from pipeline.contract import GenerationRequest


def test_what_the_lm_may_write_the_api_accepts():
    from pipeline.contract import KEY_SCALES, LANGUAGES, TIME_SIGNATURE_BEATS, TIME_SIGNATURE_UNITS
    from pipeline.lm import constrained

    assert constrained.VALID_KEYSCALES is KEY_SCALES and constrained.VALID_TIME_SIGNATURES is TIME_SIGNATURE_BEATS
    for key in KEY_SCALES:
        assert GenerationRequest(key_scale=key).key_scale == key
    for beats in TIME_SIGNATURE_BEATS:
        assert GenerationRequest(time_signature=beats).time_signature == beats
        for unit in TIME_SIGNATURE_UNITS:
            GenerationRequest(time_signature=f"{beats}/{unit}")
    for language in LANGUAGES:
        GenerationRequest(vocal_language=language)

