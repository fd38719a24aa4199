"""Files on disk: output checks and atomic writes, image arrays and image files, model
directories, run provenance."""

from convmixer_jax.files.arrays import load_images  # noqa: F401
from convmixer_jax.files.atomic import (  # noqa: F401
    save_array,
    write_bytes_atomic,
    write_text_atomic,
)
from convmixer_jax.files.image_files import (  # noqa: F401
    check_image_output,
    load_image_inputs,
    write_image_outputs,
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
from convmixer_jax.files.output_paths import check_output_path  # noqa: F401
