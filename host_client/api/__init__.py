"""The one implementation of the client: a connection and one typed part per service.

`connection.Connection` owns the channel, the auth metadata, the retry rule and
the agent's capabilities; `process.Process`, `files.Files`, `claude.Claude` and
`policy.Policy` each call their service through its generated, typed stub.
`host_client.client.CoworkClient` puts them together; `host_client.aio` adapts
the same objects to asyncio. Nothing here imports a client module.
"""
