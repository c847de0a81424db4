"""The Python SDK (corral.client.sdk.Client) and the `corral` user commands."""
