"""Telecom's line rules, as tau2's telecom tools enforce them: the one table the policy
signals and the grounder read.

Only suspend_line and resume_line check a status. resume_line also accepts "Pending
Activation", which no line in tau2's telecom database holds and no tool sets, so one exact
status per rule says all that can happen. refuel_data's status check is commented out in
tau2, and send_payment_request checks the customer's other bills, not this one's status.
"""

from sentinel.envs.pack import StateRule

RULES = (
    StateRule("suspend_line", "line_id", "Active", after="Suspended"),
    StateRule("resume_line", "line_id", "Suspended", after="Active"),
)
