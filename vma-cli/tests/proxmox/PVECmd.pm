package PVECmd;

# A re-enactment of how Proxmox VE runs external commands: pve-common
# src/PVE/Cmd.pm:run (reached as PVE::Tools::run_command) and its quoting helpers.
# Written for the vma-rs test suite from reading that code; it keeps the behaviour that
# decides how `vma` is started and how its output is consumed:
#
#  - an array of arrays is one pipeline, every argument shell-quoted, given to
#    `/bin/bash -c 'set -o pipefail && CMD1 | CMD2 ...'`;
#  - LC_ALL=C in the child's environment (unless keeplocale);
#  - input '<&STDIN' hands our standard input to the child, output '>&N' our fd N;
#  - afterfork runs in the parent right after the fork, before any output is read;
#  - stdout and stderr are read with select(), split into lines at \n, \r\n, \r or
#    backspaces, and fed to outfunc / errfunc / logfunc; without a function the bytes
#    are passed through to our own stdout / stderr;
#  - a callback that dies gets the child SIGKILLed (the bash process only, as in
#    Proxmox) and the error rethrown;
#  - a signal or a non-zero exit is an error unless noerr; errors come out as
#    "command 'CMDSTR' failed: ...".
#  - any pending alarm is cleared when the command ends.
# Not re-enacted: timeout, umask, errmsg, quiet, the rsync exit-24 exception.

use strict;
use warnings;

use IO::File;
use IO::Select;
use IPC::Open3;
use POSIX ();

use base 'Exporter';
our @EXPORT_OK = qw(run_command shell_quote cmd2string);

# String::ShellQuote::shell_quote for one argument, as PVE::Cmd::shell_quote calls it:
# left alone if it holds only [\w!%+,\-./:=@^] and no '=' (a lone argument containing
# '=' counts as an environment assignment and is quoted); otherwise single-quoted.
# (String::ShellQuote's cosmetic rewrite of runs of quotes is left out.)
sub shell_quote {
    my ($str) = @_;
    return "''" if !defined($str) || $str eq '';
    return $str if $str !~ m/[^\w!%+,\-.\/:=@^]/ && $str !~ m/=/;
    (my $q = $str) =~ s/'/'\\''/g;
    $q = "'$q'";
    $q =~ s/^''//;
    $q =~ s/''$//;
    return $q;
}

# PVE::Cmd::to_string: the arguments of one command, quoted and joined by spaces.
sub cmd2string {
    my ($cmd) = @_;
    die "no arguments" if !$cmd;
    return $cmd if !ref($cmd);
    return join(' ', map { shell_quote($_) } @$cmd);
}

# Splits what arrived into complete lines (the separators PVE::Cmd::run knows), calling
# $func for each; keeps the unfinished rest in $$partial.
sub _lines {
    my ($buf, $partial, @funcs) = @_;
    while ($buf =~ s/^([^\010\r\n]*)(?:\n|(?:\010)+|\r\n?)//) {
        my $line = $$partial . $1;
        $$partial = '';
        $_->($line) for grep { defined } @funcs;
    }
    $$partial .= $buf;
}

sub run_command {
    my ($cmd, %param) = @_;

    my $cmdstr;
    if (ref($cmd)) {
        if (ref($cmd->[0])) {
            # A pipeline: quoted commands joined by ' | ', run by bash with pipefail.
            $cmdstr = 'set -o pipefail && '
                . join(' | ', map { my $c = $_; join(' ', map { ref($_) ? $$_ : shell_quote($_) } @$c) } @$cmd);
            $cmd = ['/bin/bash', '-c', $cmdstr];
        } else {
            $cmdstr = cmd2string($cmd);
        }
    } else {
        $cmdstr = $cmd;
        $cmd = $cmd =~ m/\|/ ? ['/bin/bash', '-c', "set -o pipefail && $cmd"] : [$cmd];
    }

    my %known = map { $_ => 1 } qw(input output outfunc errfunc logfunc afterfork noerr keeplocale);
    for my $p (keys %param) {
        die "got unknown parameter '$p' for run_command\n" if !$known{$p};
    }
    my ($input, $output) = @param{qw(input output)};
    my ($outfunc, $errfunc, $logfunc) = @param{qw(outfunc errfunc logfunc)};

    my $exitcode = -1;
    my $pid;

    eval {
        my $reader = defined($output) && $output =~ m/^>&/ ? $output : IO::File->new();
        my $writer = defined($input) && $input =~ m/^<&/ ? $input : IO::File->new();
        my $error = IO::File->new();
        my $orig_pid = $$;

        eval {
            local $ENV{LC_ALL} = 'C' if !$param{keeplocale};
            local $ENV{LVM_SUPPRESS_FD_WARNINGS} = "1";
            $pid = open3($writer, $reader, $error, @$cmd) || die $!;
            # open3 closed our STDIN when it handed it over; keep fd 0 occupied.
            if (!ref($writer) && !defined(fileno(STDIN))) {
                POSIX::close(0);
                open(STDIN, '<', '/dev/null');
            }
        };
        my $err = $@;
        if ($orig_pid != $$) { # the exec failed in the child
            warn "ERROR: $err";
            POSIX::_exit(1);
        }
        die $err if $err;

        $param{afterfork}->() if $param{afterfork};

        if (ref($writer)) {
            print $writer $input if defined($input);
            close($writer);
        }

        my $select = IO::Select->new();
        $select->add($reader) if ref($reader);
        $select->add($error);
        my ($outlog, $errlog) = ('', '');

        while ($select->count) {
            for my $h ($select->can_read(1)) {
                my $buf = '';
                my $count = sysread($h, $buf, 4096);
                if (!defined($count)) {
                    my $e = $!;
                    kill(9, $pid);
                    waitpid($pid, 0);
                    die $e;
                }
                $select->remove($h) if !$count;
                my $is_out = ref($reader) && $h eq $reader;
                my ($func, $partial) = $is_out ? ($outfunc, \$outlog) : ($errfunc, \$errlog);
                if ($func || $logfunc) {
                    eval { _lines($buf, $partial, $func, $logfunc) };
                    if (my $e = $@) {
                        kill(9, $pid);
                        waitpid($pid, 0);
                        die $e;
                    }
                } elsif ($is_out) {
                    print $buf;
                    STDOUT->flush();
                } else {
                    print STDERR $buf;
                    STDERR->flush();
                }
            }
        }

        $outfunc->($outlog) if $outfunc && $outlog ne '';
        $logfunc->($outlog) if $logfunc && $outlog ne '';
        $errfunc->($errlog) if $errfunc && $errlog ne '';
        $logfunc->($errlog) if $logfunc && $errlog ne '';

        waitpid($pid, 0);
        if ($? == -1) {
            die "failed to execute\n";
        } elsif (my $sig = ($? & 127)) {
            die "got signal $sig\n";
        } elsif ($exitcode = ($? >> 8)) {
            die "exit code $exitcode\n";
        }
        alarm(0);
    };
    my $err = $@;

    # Like Proxmox, this clears any alarm the caller set (restore_vma_archive's 60 s
    # header alarm, if the CTIME line never came).
    alarm(0);

    if ($err && !$param{noerr}) {
        die "command '$cmdstr' failed: $err";
    }
    return $exitcode;
}

1;
