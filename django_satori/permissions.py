"""Which item of SATORI's permission rules each API operation needs.

Since 2025-10-21 SATORI applies the permission rule (権限ルール) of the user
who owns the API keys to API calls. A refusal is only useful when it says which
item to enable, so the labels here are those of SATORI's help article, in
Japanese as SATORI's admin screen shows them. Shared by the error text the
admin shows (:class:`~django_satori.exceptions.SatoriPermissionError`) and by
``satori_doctor``.
"""

from __future__ import annotations

from django.utils.translation import gettext as _

#: Operation -> the permission-rule item SATORI's help article names for it.
RULE_ITEMS: dict[str, str] = {
    "upsert": "カスタマー情報の編集",
    "registration": "新規登録の実行",
    "delete": "カスタマーの削除",
    "action": "カスタマーのユーザー定義アクション",
    "bulk_upload": "カスタマーの一括登録",
    "bulk_status": "カスタマーステータスの一括取得",
}
OPERATIONS: tuple[str, ...] = tuple(RULE_ITEMS)

#: The client's endpoint names (client.ENDPOINTS, ACTION_ENDPOINT) -> operation.
ENDPOINT_OPERATIONS: dict[str, str] = {
    "customer/registration": "registration",
    "customer/upsert": "upsert",
    "customer/delete": "delete",
    "customer/add_action": "action",
    "bulk/registration": "bulk_upload",
    "bulk/upsert": "bulk_upload",
    "bulk/status": "bulk_status",
}


def rule_item(operation: str) -> str:
    """The permission-rule item ``operation`` needs (KeyError for an unknown operation)."""
    return RULE_ITEMS[operation]


def operation_for_endpoint(endpoint: str | None) -> str | None:
    """The operation of a client endpoint name, or None when it is not one."""
    return ENDPOINT_OPERATIONS.get(endpoint or "")


def own_only_note() -> str:
    """SATORI's note on 「自分のみ」 rules, as the fix to look for besides the item."""
    return _(
        "A rule set to 「自分のみ」 (own only) lets the key edit or delete only the customers "
        "it registered itself."
    )


def refusal_text(operation: str | None, message: str) -> str:
    """A permission refusal worded as one: the item to enable, the own-only note, SATORI's words."""
    if operation is None or operation not in RULE_ITEMS:
        return _(
            "SATORI refused this for lack of permission: check the permission rule of the "
            "SATORI user who owns the API keys. %(note)s SATORI said: %(message)s"
        ) % {"note": own_only_note(), "message": message}
    return _(
        "SATORI refused this for lack of permission: enable 「%(item)s」 in the permission "
        "rule of the SATORI user who owns the API keys. %(note)s SATORI said: %(message)s"
    ) % {"item": rule_item(operation), "note": own_only_note(), "message": message}
