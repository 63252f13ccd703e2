"""Input checks shared by the request-level ranking models (STCA, mean pooling): one jagged request batch.

`cfg` is any config with num_items, num_actions and num_users (0 = no user ids).
"""
from __future__ import annotations

from merlin_longseq.jagged import JaggedInputError, validate_offsets


def check_history(cfg, item_ids, actions, timestamps, offsets, request_time, user_ids) -> None:
    for name, t in (("hist_item_ids", item_ids), ("hist_actions", actions), ("hist_timestamps", timestamps)):
        if t.dim() != 1 or t.dtype.is_floating_point:
            raise JaggedInputError(f"{name} must be a 1-D integer tensor [total_history], got "
                                   f"{t.dtype} of shape {tuple(t.shape)}")
        if t.shape != item_ids.shape:
            raise JaggedInputError(f"{name} has {t.shape[0]} events but hist_item_ids has {item_ids.shape[0]}")
    try:
        validate_offsets(offsets, total=item_ids.shape[0])
    except JaggedInputError as err:
        raise JaggedInputError(f"hist_offsets: {err}") from None
    requests = offsets.numel() - 1
    if request_time.shape != (requests,) or request_time.dtype.is_floating_point:
        raise JaggedInputError(f"request_time must be an integer tensor [R] = [{requests}], got "
                               f"{request_time.dtype} of shape {tuple(request_time.shape)}")
    check_id_range("hist_item_ids", item_ids, cfg.num_items)
    check_id_range("hist_actions", actions, cfg.num_actions)
    if cfg.num_users:
        if user_ids is None or user_ids.shape != (requests,) or user_ids.dtype.is_floating_point:
            got = None if user_ids is None else f"{user_ids.dtype} of shape {tuple(user_ids.shape)}"
            raise JaggedInputError(f"num_users={cfg.num_users} needs integer user_ids [R] = [{requests}], "
                                   f"got {got}")
        check_id_range("user_ids", user_ids, cfg.num_users)


def check_candidates(cfg, cand_item_ids, cand_offsets, requests: int) -> None:
    if cand_item_ids.dim() != 1 or cand_item_ids.dtype.is_floating_point:
        raise JaggedInputError(f"cand_item_ids must be a 1-D integer tensor [total_candidates], got "
                               f"{cand_item_ids.dtype} of shape {tuple(cand_item_ids.shape)}")
    try:
        validate_offsets(cand_offsets, total=cand_item_ids.shape[0])
    except JaggedInputError as err:
        raise JaggedInputError(f"cand_offsets: {err}") from None
    if cand_offsets.numel() - 1 != requests:
        raise JaggedInputError(f"cand_offsets describe {cand_offsets.numel() - 1} requests but the history "
                               f"has {requests}")
    check_id_range("cand_item_ids", cand_item_ids, cfg.num_items)


def check_id_range(name, ids, largest) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > largest):
        raise JaggedInputError(f"{name} must lie in [0, {largest}], got values in "
                               f"[{int(ids.min())}, {int(ids.max())}]")
