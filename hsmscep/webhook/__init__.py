"""The outgoing HTTP edge: signed calls to authorization and notification webhooks (httpx).

The wire format is hsmscep.policy.webhook. May import protocol, policy and errors.
"""
