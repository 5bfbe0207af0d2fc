count_op('executions')
return redis.call('HKEYS', K_EXECS)
