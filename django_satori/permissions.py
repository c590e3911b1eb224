"""Which item of SATORI's permission rules each API operation needs.

Since 2025-10-21 SATORI applies the permission rule (権限ルール) of the user
who owns the API keys to API calls. A refusal is only useful when it says which
item to enable, so the labels here are those of SATORI's help article, in
Japanese as SATORI's admin screen shows them (it has no English screen). Shared
by the error text the admin shows
(:class:`~django_satori.exceptions.SatoriPermissionError`) and by
``satori_doctor``.
"""

from __future__ import annotations

from django.utils.translation import gettext as _
from django.utils.translation import gettext as translate_marked


def gettext_noop(message: str) -> str:
    """Mark ``message`` for makemessages (which looks for this name) and return it.

    Not Django's own: that one reads settings.USE_I18N, and the standalone sandbox
    (``python -m django_satori.sandbox``) imports this module (through exceptions)
    without Django settings.
    """
    return message


#: Operation -> the item's label on SATORI's screen.
RULE_LABELS: dict[str, str] = {
    "upsert": "カスタマー情報の編集",
    "registration": "新規登録の実行",
    "delete": "カスタマーの削除",
    "action": "カスタマーのユーザー定義アクション",
    "bulk_upload": "カスタマーの一括登録",
    "bulk_status": "カスタマーステータスの一括取得",
}
OPERATIONS: tuple[str, ...] = tuple(RULE_LABELS)

#: Operation -> message id naming the item for a reader: in English a gloss with the
#: label, in Japanese the bare label. Message ids, so a stored diagnosis is worded
#: when it is shown.
RULE_ITEMS: dict[str, str] = {
    "upsert": gettext_noop("Edit customer information (カスタマー情報の編集)"),
    "registration": gettext_noop("Register new customers (新規登録の実行)"),
    "delete": gettext_noop("Delete customers (カスタマーの削除)"),
    "action": gettext_noop("Customer user-defined actions (カスタマーのユーザー定義アクション)"),
    "bulk_upload": gettext_noop("Bulk registration of customers (カスタマーの一括登録)"),
    "bulk_status": gettext_noop(
        "Bulk retrieval of customer status (カスタマーステータスの一括取得)"
    ),
}

#: SATORI's note on a rule limited to 「自分のみ」 (own records only).
OWN_ONLY_NOTE = gettext_noop(
    "A rule set to 「自分のみ」 (own records only) lets the key edit or delete only the "
    "customers it registered itself."
)

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
    """The rule item ``operation`` needs, in the active language (KeyError if unknown)."""
    return translate_marked(RULE_ITEMS[operation])  # marked with gettext_noop above


def operation_for_endpoint(endpoint: str | None) -> str | None:
    """The operation of a client endpoint name, or None when it is not one."""
    return ENDPOINT_OPERATIONS.get(endpoint or "")


def own_only_note() -> str:
    """SATORI's note on 「自分のみ」 rules, as the fix to look for besides the item."""
    return translate_marked(OWN_ONLY_NOTE)  # marked with gettext_noop above


def refusal_text(operation: str | None, message: str) -> str:
    """A permission refusal worded as one: the item to enable, the own-only note, SATORI's words."""
    if operation is None or operation not in RULE_LABELS:
        return _(
            "SATORI refused this for lack of permission: check the permission rule of the "
            "SATORI user who owns the API keys. %(note)s SATORI said: %(message)s"
        ) % {"note": own_only_note(), "message": message}
    return _(
        "SATORI refused this for lack of permission: enable 「%(item)s」 in the permission "
        "rule of the SATORI user who owns the API keys. %(note)s SATORI said: %(message)s"
    ) % {"item": RULE_LABELS[operation], "note": own_only_note(), "message": message}
