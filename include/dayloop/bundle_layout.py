"""The file names inside a model bundle, in one place.

A bundle is written by :mod:`dayloop.training.bundle` and read by the registry, the offline
gate and the rollout. The rollout must not import the training package (the layering
contract in pyproject.toml), so the names live here, below both.
"""

BUNDLE_FORMAT_VERSION = 1
USER_TOWER_FILE = "user_tower.pt"
ITEM_EMBEDDINGS_FILE = "item_embeddings.npy"
ITEM_IDS_FILE = "item_ids.npy"
USER_IDS_FILE = "user_ids.npy"
USER_FEATURES_FILE = "user_features.npy"
USER_HISTORY_FILE = "user_history.npy"
SERVING_TOWER_FILE = "serving_tower.pt"
MODEL_META_FILE = "model_meta.json"
BUNDLE_FILES = (
    USER_TOWER_FILE,
    ITEM_EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    USER_IDS_FILE,
    USER_FEATURES_FILE,
    USER_HISTORY_FILE,
    SERVING_TOWER_FILE,
    MODEL_META_FILE,
)
