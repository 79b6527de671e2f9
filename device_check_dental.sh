export PYTHONPATH=$PWD/_devdeps
timeout 420 python tools/reproduce_paper.py --preset quick --out $OUT/runs > $OUT/table.txt 2>$OUT/quick.err
echo rc=$?
cat $OUT/table.txt; tail -3 $OUT/quick.err
R=$(ls -d $OUT/runs/run-* | tail -1)
cp $R/*.png $R/summary.json $R/log.txt $OUT/ 2>/dev/null
rm -rf $OUT/runs
