/*
 * A stand-in for powershell.exe inside a Wine prefix, for tests/test_msi_wine.py: Windows
 * Installer (Wine's msiexec) starts it for VezaProvisioner.msi's script actions, and it records
 * what it was given and exits with the code the test chose.
 *
 * Models, from the real behaviour:
 * - the argv powershell.exe sees: Windows hands a process one command line, and powershell.exe
 *   splits it with CommandLineToArgvW rules (backslashes before a quote, quoted spaces); this
 *   program splits it with CommandLineToArgvW itself (Wine's shell32), so a quoting mistake in
 *   the MSI shows up as a wrong argument here;
 * - the exit code: `powershell -File script.ps1` exits with the script's `exit N`; install.ps1
 *   and uninstall.ps1 exit 1 on failure (read in deploy/iis/*.ps1), which Windows Installer
 *   turns into a failed action (msidbCustomActionType without "ignore return code").
 *
 * Does not model: PowerShell itself (parameter binding, execution policy, signatures), the
 * scripts' effects on IIS or the disk, or LocalSystem: it runs no script at all.
 *
 * Records, appended to C:\vpfake\calls.log (UTF-8): "CALL", one "ARG\t<arg>" line per argument
 * after argv[0], then "EXIT\t<code>". Exits 1 when the raw command line contains any line of
 * C:\vpfake\fail-when.txt, else 0.
 */
#include <windows.h>
#include <shellapi.h>
#include <stdio.h>
#include <wchar.h>

static void put_utf8(FILE *out, const wchar_t *text)
{
    int size = WideCharToMultiByte(CP_UTF8, 0, text, -1, NULL, 0, NULL, NULL);
    char *buffer = (char *)HeapAlloc(GetProcessHeap(), 0, size);
    if (!buffer) return;
    WideCharToMultiByte(CP_UTF8, 0, text, -1, buffer, size, NULL, NULL);
    fputs(buffer, out);
    HeapFree(GetProcessHeap(), 0, buffer);
}

int wmain(void)
{
    const wchar_t *line = GetCommandLineW();
    int argc = 0, code = 0, i;
    wchar_t **argv = CommandLineToArgvW(line, &argc);
    wchar_t rule[1024];
    FILE *rules = _wfopen(L"C:\\vpfake\\fail-when.txt", L"r, ccs=UTF-8");
    FILE *out;

    if (rules) {
        while (fgetws(rule, 1024, rules)) {
            rule[wcscspn(rule, L"\r\n")] = 0;
            if (rule[0] && wcsstr(line, rule)) code = 1;
        }
        fclose(rules);
    }
    out = _wfopen(L"C:\\vpfake\\calls.log", L"ab");
    if (!out || !argv) return 2;
    fputs("CALL\n", out);
    for (i = 1; i < argc; i++) {
        fputs("ARG\t", out);
        put_utf8(out, argv[i]);
        fputs("\n", out);
    }
    fprintf(out, "EXIT\t%d\n", code);
    fclose(out);
    return code;
}
