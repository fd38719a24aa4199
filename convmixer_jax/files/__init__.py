"""Files on disk: atomic writes, image arrays, model directories, run provenance."""
from convmixer_jax.files.arrays import load_images  # noqa: F401
from convmixer_jax.files.atomic import (  # noqa: F401
    check_output_path,
    save_array,
    write_bytes_atomic,
    write_text_atomic,
)
from convmixer_jax.files.model_dir import (  # noqa: F401
    ModelDirError,
    decrypt_model_dir,
    encrypt_model_dir,
    is_encrypted,
    load_model,
    rekey_model_dir,
    save_model,
)
