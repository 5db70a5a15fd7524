// What a ThingWorx application server does with pgjdbc, run against a PostgreSQL
// endpoint (the pglifeguard proxy in tests/integration/jdbc.rs).
//
// Usage: java -cp <classes>:/usr/share/java/postgresql.jar JdbcCheck <jdbc-url>
//
// Prints one "ok <section> (<ms> ms)" line per section and "OK <n> checks" at the end.
// Any mismatch or unexpected exception prints "FAIL: ..." to stderr and exits with 1.

import java.io.StringReader;
import java.io.StringWriter;
import java.math.BigDecimal;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.time.LocalDateTime;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashSet;
import java.util.List;
import java.util.Set;
import java.util.concurrent.CyclicBarrier;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicInteger;

import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

public class JdbcCheck {
    /** Upper bound for the whole run, so a hung protocol exchange cannot hang the test. */
    static final long WATCHDOG_SECONDS = 240;

    static final AtomicInteger checks = new AtomicInteger();
    static String url;

    static final class CheckFailed extends RuntimeException {
        private static final long serialVersionUID = 1L;

        CheckFailed(String msg) {
            super(msg);
        }
    }

    static void check(boolean cond, String what) {
        if (!cond) {
            throw new CheckFailed(what);
        }
        checks.incrementAndGet();
    }

    static void checkEq(Object expected, Object actual, String what) {
        check(expected == null ? actual == null : expected.equals(actual),
                what + ": expected <" + expected + "> but got <" + actual + ">");
    }

    static Connection connect() throws SQLException {
        return DriverManager.getConnection(url);
    }

    static long queryLong(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            check(rs.next(), "no row from: " + sql);
            return rs.getLong(1);
        }
    }

    static String queryString(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            check(rs.next(), "no row from: " + sql);
            return rs.getString(1);
        }
    }

    static void exec(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement()) {
            st.execute(sql);
        }
    }

    interface Section {
        void run() throws Exception;
    }

    static void section(String name, Section body) throws Exception {
        long start = System.nanoTime();
        try {
            body.run();
        } catch (CheckFailed | SQLException e) {
            throw new RuntimeException("section '" + name + "' failed: " + e.getMessage(), e);
        }
        System.out.printf("ok %s (%d ms)%n", name, (System.nanoTime() - start) / 1_000_000);
        System.out.flush();
    }

    public static void main(String[] args) {
        if (args.length != 1) {
            System.err.println("usage: JdbcCheck <jdbc-url>");
            System.exit(2);
        }
        url = args[0];
        Thread watchdog = new Thread(() -> {
            try {
                Thread.sleep(WATCHDOG_SECONDS * 1000);
            } catch (InterruptedException e) {
                return;
            }
            System.err.println("FAIL: still running after " + WATCHDOG_SECONDS + " s; thread dump follows");
            Thread.getAllStackTraces().forEach((t, stack) -> {
                System.err.println("thread " + t.getName() + ":");
                for (StackTraceElement f : stack) {
                    System.err.println("    at " + f);
                }
            });
            Runtime.getRuntime().halt(1);
        }, "watchdog");
        watchdog.setDaemon(true);
        watchdog.start();
        DriverManager.setLoginTimeout(15);

        try {
            section("startup parameters", JdbcCheck::startupParameters);
            section("prepared statement (server-side after 5 uses)", JdbcCheck::preparedStatement);
            section("fetch size cursor", JdbcCheck::fetchSize);
            section("transactions", JdbcCheck::transactions);
            section("COPY via CopyManager", JdbcCheck::copy);
            section("cancel", JdbcCheck::cancel);
            section("query timeout", JdbcCheck::queryTimeout);
            section("batch", JdbcCheck::batch);
            section("concurrent connections", JdbcCheck::concurrent);
            section("errors", JdbcCheck::errors);
        } catch (Throwable e) {
            System.err.println("FAIL: " + e.getMessage());
            e.printStackTrace();
            System.err.flush();
            System.exit(1);
        }
        System.out.println("OK " + checks.get() + " checks");
        System.out.flush();
        System.exit(0);
    }

    /** ApplicationName and the session settings pgjdbc asks for reach the server. */
    static void startupParameters() throws Exception {
        try (Connection c = connect()) {
            checkEq("thingworx", queryString(c, "show application_name"), "application_name");
            checkEq("UTF8", queryString(c, "show client_encoding"), "client_encoding");
            checkEq("ISO, MDY", queryString(c, "show DateStyle"), "DateStyle");
            checkEq("postgres", queryString(c, "select current_user"), "current_user");
            checkEq("postgres", queryString(c, "select current_database()"), "current_database()");
        }
    }

    /**
     * One PreparedStatement executed 20 times with different parameters of several types.
     * With prepareThreshold=5 pgjdbc switches from unnamed to a named server-side statement
     * (and to binary transfer) part-way through; both must give the same answers.
     */
    static void preparedStatement() throws Exception {
        try (Connection c = connect()) {
            checkEq(0L, queryLong(c, "select count(*) from pg_prepared_statements"),
                    "no prepared statements on a fresh session");
            BigDecimal base = new BigDecimal("12345678901234567890.123456789");
            LocalDateTime t0 = LocalDateTime.of(2024, 2, 28, 23, 59, 58, 123_456_000);
            try (PreparedStatement ps = c.prepareStatement(
                    "select ?::int4 * 2, ?::text || '!', ?::timestamp + interval '1 day 1 second',"
                            + " ?::bytea || decode('00ff', 'hex'), ?::numeric * 2")) {
                for (int i = 0; i < 20; i++) {
                    int n = i * 1000 - 7;
                    String text = "héllo wörld \u20ac " + i + " 'quoted' \\ back";
                    LocalDateTime ts = t0.plusDays(i).plusNanos(i * 1000L);
                    byte[] bytes = new byte[i + 1];
                    for (int k = 0; k < bytes.length; k++) {
                        bytes[k] = (byte) (k * 37 + i);
                    }
                    BigDecimal num = base.add(BigDecimal.valueOf(i)).negate();

                    ps.setInt(1, n);
                    ps.setString(2, text);
                    ps.setObject(3, ts);
                    ps.setBytes(4, bytes);
                    ps.setBigDecimal(5, num);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next(), "execution " + i + " returned no row");
                        checkEq(n * 2, rs.getInt(1), "int4 at execution " + i);
                        checkEq(text + "!", rs.getString(2), "text at execution " + i);
                        checkEq(ts.plusDays(1).plusSeconds(1), rs.getObject(3, LocalDateTime.class),
                                "timestamp at execution " + i);
                        byte[] expected = Arrays.copyOf(bytes, bytes.length + 2);
                        expected[bytes.length] = 0;
                        expected[bytes.length + 1] = (byte) 0xff;
                        check(Arrays.equals(expected, rs.getBytes(4)),
                                "bytea at execution " + i + ": expected " + Arrays.toString(expected)
                                        + " but got " + Arrays.toString(rs.getBytes(4)));
                        BigDecimal gotNum = rs.getBigDecimal(5);
                        check(gotNum != null && num.multiply(BigDecimal.valueOf(2)).compareTo(gotNum) == 0,
                                "numeric at execution " + i + ": expected " + num.multiply(BigDecimal.valueOf(2))
                                        + " but got " + gotNum);
                        check(!rs.next(), "execution " + i + " returned more than one row");
                    }
                }
                long prepared = queryLong(c, "select count(*) from pg_prepared_statements");
                check(prepared > 0, "pg_prepared_statements is empty after 20 executions with prepareThreshold=5"
                        + " (server-side prepare never happened on this session)");
            }
        }
    }

    /** autocommit off + setFetchSize: pgjdbc reads through a portal, 500 rows per Execute. */
    static void fetchSize() throws Exception {
        try (Connection c = connect()) {
            c.setAutoCommit(false);
            try (Statement st = c.createStatement()) {
                st.setFetchSize(500);
                long count = 0;
                long sum = 0;
                long last = 0;
                boolean ordered = true;
                try (ResultSet rs = st.executeQuery("select g from generate_series(1, 50000) g")) {
                    while (rs.next()) {
                        long g = rs.getLong(1);
                        if (g != last + 1) {
                            ordered = false;
                        }
                        last = g;
                        count++;
                        sum += g;
                    }
                }
                checkEq(50000L, count, "rows read with fetch size 500");
                checkEq(50000L * 50001L / 2, sum, "sum of rows read with fetch size 500");
                check(ordered, "rows arrived out of order or with gaps");
            }
            c.commit();
            c.setAutoCommit(true);
            checkEq(1L, queryLong(c, "select 1"), "session usable after the cursor");
        }
    }

    /** Rolled-back rows are gone, committed rows are visible, also to another session. */
    static void transactions() throws Exception {
        try (Connection c = connect(); Connection other = connect()) {
            exec(c, "create table jdbc_tx(id int primary key, note text)");
            c.setAutoCommit(false);
            try (PreparedStatement ins = c.prepareStatement("insert into jdbc_tx values (?, ?)")) {
                ins.setInt(1, 1);
                ins.setString(2, "rolled back");
                checkEq(1, ins.executeUpdate(), "insert count");
                checkEq(1L, queryLong(c, "select count(*) from jdbc_tx"), "own uncommitted row visible");
                checkEq(0L, queryLong(other, "select count(*) from jdbc_tx"), "uncommitted row invisible to others");
                c.rollback();
                checkEq(0L, queryLong(c, "select count(*) from jdbc_tx"), "row gone after rollback");

                ins.setInt(1, 2);
                ins.setString(2, "committed");
                checkEq(1, ins.executeUpdate(), "insert count");
                c.commit();
            }
            c.setAutoCommit(true);
            checkEq("committed", queryString(c, "select string_agg(note, ',') from jdbc_tx"), "committed row");
            checkEq("committed", queryString(other, "select string_agg(note, ',') from jdbc_tx"),
                    "committed row seen by another session");
        }
    }

    /** COPY FROM STDIN and COPY TO STDOUT through org.postgresql.copy.CopyManager. */
    static void copy() throws Exception {
        try (Connection c = connect()) {
            exec(c, "create table jdbc_copy(id int, name text, payload text)");
            StringBuilder data = new StringBuilder();
            for (int i = 0; i < 10000; i++) {
                data.append(i).append('\t').append("name-").append(i).append(" ünï")
                        .append('\t').append("x".repeat(i % 200)).append('\n');
            }
            String input = data.toString();
            CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
            long in = copy.copyIn("copy jdbc_copy from stdin", new StringReader(input));
            checkEq(10000L, in, "rows reported by copyIn");
            checkEq(10000L, queryLong(c, "select count(*) from jdbc_copy"), "rows in the table after copyIn");

            StringWriter out = new StringWriter();
            long outRows = copy.copyOut("copy (select * from jdbc_copy order by id) to stdout", out);
            checkEq(10000L, outRows, "rows reported by copyOut");
            check(input.equals(out.toString()), "copyOut text differs from copyIn text (lengths "
                    + input.length() + " vs " + out.toString().length() + ")");
            checkEq(1L, queryLong(c, "select 1"), "session usable after COPY");
        }
    }

    /** Statement.cancel() from another thread stops a running query; the session stays usable. */
    static void cancel() throws Exception {
        ExecutorService pool = Executors.newSingleThreadExecutor();
        try (Connection victim = connect(); Connection watcher = connect()) {
            long pid = queryLong(victim, "select pg_backend_pid()");
            Statement st = victim.createStatement();
            long start = System.nanoTime();
            Future<Object> sleeping = pool.submit(() -> {
                try (ResultSet rs = st.executeQuery("select pg_sleep(60)")) {
                    return "finished without being cancelled (" + rs.next() + ")";
                } catch (SQLException e) {
                    return e;
                }
            });
            boolean active = false;
            try (PreparedStatement probe = watcher.prepareStatement(
                    "select count(*) from pg_stat_activity where pid = ? and state = 'active'"
                            + " and query like '%pg_sleep(60)%'")) {
                probe.setInt(1, (int) pid);
                for (int i = 0; i < 500 && !active; i++) {
                    try (ResultSet rs = probe.executeQuery()) {
                        rs.next();
                        active = rs.getLong(1) == 1;
                    }
                    if (!active) {
                        Thread.sleep(20);
                    }
                }
            }
            check(active, "pg_sleep(60) never showed up as active in pg_stat_activity for backend " + pid);
            st.cancel();
            Object result;
            try {
                result = sleeping.get(30, TimeUnit.SECONDS);
            } catch (TimeoutException e) {
                throw new CheckFailed("the cancelled query was still running 30 s after Statement.cancel()");
            }
            long ms = (System.nanoTime() - start) / 1_000_000;
            check(result instanceof SQLException, "pg_sleep(60) was not cancelled: " + result);
            SQLException e = (SQLException) result;
            checkEq("57014", e.getSQLState(), "SQLState of the cancelled query (" + e.getMessage() + ")");
            check(ms < 30_000, "cancel took " + ms + " ms");
            st.close();
            checkEq(1L, queryLong(victim, "select 1"), "session usable after the cancel");
            checkEq(pid, queryLong(victim, "select pg_backend_pid()"), "same backend after the cancel");
        } finally {
            pool.shutdownNow();
        }
    }

    /** Statement.setQueryTimeout (pgjdbc implements it with a cancel request from a timer). */
    static void queryTimeout() throws Exception {
        try (Connection c = connect(); Statement st = c.createStatement()) {
            st.setQueryTimeout(1);
            long start = System.nanoTime();
            try {
                st.executeQuery("select pg_sleep(60)").close();
                throw new CheckFailed("pg_sleep(60) with a 1 s query timeout completed");
            } catch (SQLException e) {
                checkEq("57014", e.getSQLState(), "SQLState after the query timeout (" + e.getMessage() + ")");
            }
            long ms = (System.nanoTime() - start) / 1_000_000;
            check(ms < 30_000, "query timeout of 1 s took " + ms + " ms");
            st.setQueryTimeout(0);
            checkEq(1L, queryLong(c, "select 1"), "session usable after the query timeout");
        }
    }

    /** addBatch x1000 + executeBatch: many Parse/Bind/Execute pipelined before a Sync. */
    static void batch() throws Exception {
        try (Connection c = connect()) {
            exec(c, "create table jdbc_batch(id int primary key, name text, amount numeric)");
            try (PreparedStatement ps = c.prepareStatement("insert into jdbc_batch values (?, ?, ?)")) {
                for (int i = 0; i < 1000; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "row " + i);
                    ps.setBigDecimal(3, BigDecimal.valueOf(i, 2));
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                checkEq(1000, counts.length, "executeBatch result length");
                boolean allOne = true;
                for (int n : counts) {
                    allOne &= n == 1;
                }
                check(allOne, "every batched insert reports 1 row: " + Arrays.toString(Arrays.copyOf(counts, 10)) + "...");
            }
            checkEq(1000L, queryLong(c, "select count(*) from jdbc_batch"), "rows after executeBatch");
            checkEq(499500L, queryLong(c, "select sum(id) from jdbc_batch"), "sum of ids after executeBatch");

            // The same in a transaction that is rolled back, then committed.
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("insert into jdbc_batch values (?, ?, ?)")) {
                for (int i = 1000; i < 2000; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "tx row " + i);
                    ps.setBigDecimal(3, BigDecimal.ONE);
                    ps.addBatch();
                }
                checkEq(1000, ps.executeBatch().length, "executeBatch result length in a transaction");
                c.rollback();
                checkEq(1000L, queryLong(c, "select count(*) from jdbc_batch"), "rows after a rolled-back batch");
            }
            c.setAutoCommit(true);
        }
    }

    /** 10 threads, each with its own connection (and so its own backend), 50 queries each. */
    static void concurrent() throws Exception {
        int threads = 10;
        int queries = 50;
        CyclicBarrier barrier = new CyclicBarrier(threads);
        ExecutorService pool = Executors.newFixedThreadPool(threads);
        try {
            List<Future<Long>> results = new ArrayList<>();
            for (int t = 0; t < threads; t++) {
                final int id = t;
                results.add(pool.submit(() -> {
                    try (Connection c = connect()) {
                        return concurrentSession(c, id, queries, barrier);
                    } catch (Throwable e) {
                        // Release the other threads instead of leaving them waiting at the barrier.
                        barrier.reset();
                        throw e;
                    }
                }));
            }
            Set<Long> pids = new HashSet<>();
            for (int t = 0; t < threads; t++) {
                try {
                    pids.add(results.get(t).get(120, TimeUnit.SECONDS));
                } catch (ExecutionException e) {
                    throw new CheckFailed("thread " + t + ": " + e.getCause());
                }
            }
            checkEq(threads, pids.size(), "distinct backends among " + threads + " concurrent sessions " + pids);
        } finally {
            pool.shutdownNow();
        }
    }

    /** One thread of {@link #concurrent}: returns the backend pid it saw throughout. */
    static long concurrentSession(Connection c, int id, int queries, CyclicBarrier barrier) throws Exception {
        long pid = queryLong(c, "select pg_backend_pid()");
        // Everyone is connected at once here, so each session holds its own backend.
        barrier.await(60, TimeUnit.SECONDS);
        try (PreparedStatement ps = c.prepareStatement(
                "select ?::int, ?::text, pg_backend_pid(), current_setting('application_name')")) {
            for (int q = 0; q < queries; q++) {
                String where = "thread " + id + " query " + q;
                ps.setInt(1, id);
                ps.setString(2, where);
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next(), where + ": no row");
                    checkEq(id, rs.getInt(1), where + ": thread id");
                    checkEq(where, rs.getString(2), where + ": text");
                    checkEq(pid, rs.getLong(3), where + ": backend pid");
                    checkEq("thingworx", rs.getString(4), where + ": application_name");
                    check(!rs.next(), where + ": more than one row");
                }
            }
        }
        barrier.await(60, TimeUnit.SECONDS);
        return pid;
    }

    /** A failed statement in autocommit mode (and in a transaction) does not break the session. */
    static void errors() throws Exception {
        try (Connection c = connect()) {
            try {
                queryLong(c, "select 1/0");
                throw new CheckFailed("select 1/0 succeeded");
            } catch (SQLException e) {
                checkEq("22012", e.getSQLState(), "SQLState of select 1/0 (" + e.getMessage() + ")");
            }
            checkEq(2L, queryLong(c, "select 2"), "statement after the error in autocommit mode");

            // The same with a prepared statement that has gone server-side.
            try (PreparedStatement ps = c.prepareStatement("select 10 / ?::int")) {
                for (int i = 10; i >= 0; i--) {
                    ps.setInt(1, i);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(i != 0, "10 / 0 succeeded");
                        rs.next();
                        checkEq(10 / i, rs.getInt(1), "10 / " + i);
                    } catch (SQLException e) {
                        check(i == 0, "10 / " + i + " failed: " + e.getMessage());
                        checkEq("22012", e.getSQLState(), "SQLState of 10 / 0");
                    }
                }
                ps.setInt(1, 5);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    checkEq(2, rs.getInt(1), "prepared statement after its own error");
                }
            }

            // In a transaction: the error aborts it, rollback recovers the session.
            c.setAutoCommit(false);
            try {
                queryLong(c, "select 1/0");
                throw new CheckFailed("select 1/0 succeeded");
            } catch (SQLException e) {
                checkEq("22012", e.getSQLState(), "SQLState of select 1/0 in a transaction");
            }
            try {
                queryLong(c, "select 3");
                throw new CheckFailed("a statement in an aborted transaction succeeded");
            } catch (SQLException e) {
                checkEq("25P02", e.getSQLState(), "SQLState in an aborted transaction");
            }
            c.rollback();
            checkEq(4L, queryLong(c, "select 4"), "statement after rolling back the failed transaction");
            c.commit();
            c.setAutoCommit(true);
        }
    }
}
