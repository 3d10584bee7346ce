"""The keys spread over Ray workers (`--workers N`): each key, or each group of limits.groups,
owned by one worker; the driver keeps the journal of record and hands out the jobs.

    cluster.py   the workers' life: started, checked, replaced when they die, stopped
    members.py   the workers as the driver knows them, and the orders sent to all
    exchange.py  the traffic with one worker: asks and jobs, updates and acknowledgements
    remote.py    a worker itself (a Ray actor): the same key driver as a local run
"""
