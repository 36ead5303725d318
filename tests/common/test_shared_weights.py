from common.generation import DecodingConfig, GenerationRow, generate
from common.model_loading import fingerprint_model
from common.shared_weights import materialize_model, share_model


def test_materialized_model_is_zero_copy_and_identical(ray_session, tiny_model):
    check_zero_copy_and_identical(tiny_model)


def test_materialized_encoder_decoder_model_is_zero_copy_and_identical(ray_session, tiny_seq2seq):
    """BART and T5 tie their embeddings and LM head (several names, one tensor): the
    rebuilt sequence-to-sequence model must be the same model, zero-copy."""
    check_zero_copy_and_identical(tiny_seq2seq)


def check_zero_copy_and_identical(tiny_model):
    import ray

    shared = share_model(tiny_model)

    @ray.remote
    def rebuild(shared):
        loaded = materialize_model(shared)
        rows = [GenerationRow([5, 6, 7], None)]
        output = generate(
            loaded.model, rows, DecodingConfig(max_new_tokens=5), eos_token_id=2, pad_token_id=0
        )
        return loaded.zero_copy, fingerprint_model(loaded.model), output

    zero_copy, fingerprint, output = ray.get(rebuild.remote(shared))
    assert zero_copy
    assert fingerprint == tiny_model.fingerprint  # every weight and the config came through
    expected = generate(
        tiny_model.model,
        [GenerationRow([5, 6, 7], None)],
        DecodingConfig(max_new_tokens=5),
        eos_token_id=2,
        pad_token_id=0,
    )
    assert output == expected
