count_op('release')
if drop_lease(ARGV[2], ARGV[3], ARGV[4]) then return 1 end
return 0
