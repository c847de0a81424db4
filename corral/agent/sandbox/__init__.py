"""The attempt sandbox: what contains a job attempt and what it can reach.

host     what this machine allows, found once at agent start (cgroups, job user,
         namespaces) and described to the server
cgroups  the agent's parent group and one group per attempt: kill, limits, accounting
jobuser  the unprivileged user a root agent runs jobs as
attempt  one attempt's sandbox: prepare, spawn, kill, collect, remove
collect  trusted output collection (no link is ever followed)
workdir  safe unpacking of a shipped working directory
"""
