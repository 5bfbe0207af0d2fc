count_op('latest')
return latest(ARGV[2])
