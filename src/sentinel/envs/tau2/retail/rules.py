"""Retail's order rules, as tau2's retail tools enforce them: the one table the policy signals
and the grounder read."""

from sentinel.envs.pack import StateRule

RULES = (
    StateRule("cancel_pending_order", "order_id", "pending", after="cancelled"),
    StateRule("modify_pending_order_items", "order_id", "pending", after="pending (item modified)"),
    StateRule("modify_pending_order_address", "order_id", "pending", match="contains"),
    StateRule("modify_pending_order_payment", "order_id", "pending", match="contains"),
    StateRule("return_delivered_order_items", "order_id", "delivered", after="return requested"),
    StateRule(
        "exchange_delivered_order_items", "order_id", "delivered", after="exchange requested"
    ),
)
