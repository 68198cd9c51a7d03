<#
.SYNOPSIS
    Installs or upgrades VezaProvisioner in IIS on the Exchange server, from the offline bundle.

.DESCRIPTION
    Automates every manual step of Veza's "Infrastructure Setup" for Exchange: finds the
    PowerShell and RemoteExchange.ps1 paths, creates the application pool (No Managed Code, the
    service account, user profile loaded), the application "VezaProvisioner" under the site,
    Anonymous off / Basic on / Require SSL, and installs the service from the bundle's wheelhouse
    (no internet). Then it runs `vezaprovisioner doctor` and prints the values to enter in Veza.

    Safe to re-run: every step checks the current state first, so running it again repairs or
    upgrades an installation. -WhatIf shows what would change. It stops at the first failed step
    with a sentence saying what to do.

    The service account's password is only handed to IIS, which stores it encrypted in
    applicationHost.config; this script never writes or prints it.

    -KeepPoolIdentity takes no account at all (the MSI uses it, because an MSI property would
    put a password in the MSI log): an application pool that already exists keeps its identity
    (the admin followed the product page's manual steps); a pool this script creates keeps IIS's
    default identity, and the final message says how to set the service account.

    -FromMsi: run by VezaProvisioner.msi as LocalSystem. Windows Installer keeps none of a custom
    action's output, so every line also goes to <InstallRoot>\logs\install-msi.log, and the
    self-test's Exchange checks (which need the pool's service account) only warn.

.EXAMPLE
    .\install.ps1 -Credential (Get-Credential CONTOSO\svc-veza) -TestIdentity testuser@contoso.com -PublicHostName mail.contoso.com

.EXAMPLE
    .\install.ps1 -GroupManagedServiceAccount 'CONTOSO\gmsa-veza$' -AllowedUsers 'CONTOSO\veza-integration' -WhatIf

.EXAMPLE
    .\install.ps1 -KeepPoolIdentity -AppPoolName 'VezaProvisionerPool'
#>
[CmdletBinding(SupportsShouldProcess = $true, DefaultParameterSetName = 'Credential')]
param(
    # The service account the application pool runs as (needs the Mail Recipients role).
    [Parameter(Mandatory = $true, ParameterSetName = 'Credential')]
    [System.Management.Automation.PSCredential] $Credential,

    # Or a group managed service account (DOMAIN\name$), which has no password to enter.
    [Parameter(Mandatory = $true, ParameterSetName = 'Gmsa')]
    [ValidatePattern('^[^\\]+\\[^\\]+\$$')]
    [string] $GroupManagedServiceAccount,

    # Or no account: reuse an existing pool with its identity, or create one without a service
    # account for the admin to set (IIS Manager, or this script with -Credential).
    [Parameter(Mandatory = $true, ParameterSetName = 'KeepPoolIdentity')]
    [switch] $KeepPoolIdentity,

    # The unpacked bundle (holds wheelhouse\, web.config and VERSION); default: two levels up.
    [string] $BundleRoot = (Join-Path $PSScriptRoot '..\..'),
    # A local folder without spaces, quotes, ';', '|' or '%' (they would break FastCGI's
    # scriptProcessor, PYTHONPATH or wfastcgi's %VAR% expansion).
    [ValidatePattern('^[A-Za-z]:\\[^\s''";|%]*$')]
    [string] $InstallRoot = 'C:\VezaProvisioner',
    [string] $SiteName = 'Default Web Site',
    [ValidatePattern('^[A-Za-z0-9._~-]+$')]
    [string] $AppName = 'VezaProvisioner',
    [string] $AppPoolName = 'VezaProvisionerPool',
    # A 64-bit CPython 3.10-3.13 installed for all users; default: the newest one registered.
    [string] $PythonExe = '',
    # Default: $env:SystemRoot\System32\WindowsPowerShell\v1.0\powershell.exe
    [string] $PowerShellPath = '',
    # Default: from $env:ExchangeInstallPath or the Exchange Setup registry key.
    [string] $RemoteExchangePath = '',
    # Callers allowed besides IIS's Basic check (DOMAIN\user or UPN); empty: any IIS-authenticated
    # user. Also one comma-separated string, which is what `powershell -File` (the MSI) passes.
    [string[]] $AllowedUsers = @(),
    # Domain IIS assumes when a caller sends a bare user name.
    [string] $DefaultLogonDomain = '',
    # A user for the self-test's read-only Get-User (recommended).
    [string] $TestIdentity = '',
    # The host name Veza uses to reach this server, as on the site's HTTPS certificate (for
    # example mail.contoso.com); default: this computer's DNS name. Only the printed Instance
    # URL uses it.
    [ValidatePattern('^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$')]
    [string] $PublicHostName = '',
    # Run by VezaProvisioner.msi: a transcript in <InstallRoot>\logs\install-msi.log, and the
    # Exchange self-test (which needs the pool's service account) only warns.
    [switch] $FromMsi
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

$SupportedPython = @('3.13', '3.12', '3.11', '3.10')
$AppHost = 'MACHINE/WEBROOT/APPHOST'
$Location = "$SiteName/$AppName"
$VenvDir = Join-Path $InstallRoot 'venv'
$AppDir = Join-Path $InstallRoot 'app'
$ConfigDir = Join-Path $InstallRoot 'config'
$DataDir = Join-Path $InstallRoot 'data'
$ConfigFile = Join-Path $ConfigDir 'vezaprovisioner.toml'
$VenvPython = Join-Path $VenvDir 'Scripts\python.exe'
$WfastcgiPy = Join-Path $VenvDir 'Lib\site-packages\wfastcgi.py'
$SitePackages = Join-Path $VenvDir 'Lib\site-packages'
$Cli = Join-Path $VenvDir 'Scripts\vezaprovisioner.exe'
# Names the pool this script created, so that uninstall.ps1 removes that pool and no other.
$PoolMarker = Join-Path $ConfigDir 'created-app-pool.txt'
# Doctor checks that run as the pool's service account on the server; under the MSI this script
# runs as LocalSystem and a new pool has no service account yet, so they cannot speak for it.
$IdentityChecks = @('exchange', 'get-user')
$Utf8 = New-Object System.Text.UTF8Encoding($false)
$LogFile = ''
$PendingIdentity = ''
# Under the MSI: what this run created, one "kind<TAB>what" line each, so that the MSI's rollback
# action (uninstall.ps1 -Rollback) removes exactly that when the installation fails.
$CreatedList = ''

function Write-Line {
    # The script's output: the console and, under the MSI, the transcript file (Windows
    # Installer keeps none of a custom action's output).
    param([string] $Text = '')
    Write-Host $Text
    if ($script:LogFile) {
        [System.IO.File]::AppendAllText($script:LogFile, $Text + [Environment]::NewLine, $Utf8)
    }
}

function Open-Transcript {
    # Starts <InstallRoot>\logs\<Name> afresh; it holds what Write-Line writes, never a secret.
    param([string] $Name)
    $folder = Join-Path $InstallRoot 'logs'
    [System.IO.Directory]::CreateDirectory($folder) | Out-Null
    $script:LogFile = Join-Path $folder $Name
    [System.IO.File]::WriteAllText($script:LogFile, '', $Utf8)
}

function Add-Created {
    # Records one thing this run created (under the MSI only; see $CreatedList).
    param([string] $Kind, [string] $What)
    if ($script:CreatedList) {
        [System.IO.File]::AppendAllText($script:CreatedList, "$Kind`t$What" + [Environment]::NewLine, $Utf8)
    }
}

function Invoke-Step {
    # Runs one step; a failure stops the script with what failed and what to do about it.
    param([string] $Name, [string] $Fix, [scriptblock] $Action)
    Write-Line "==> $Name"
    try {
        & $Action
    }
    catch {
        throw "Step '$Name' failed: $($_.Exception.Message) What to do: $Fix"
    }
}

function Invoke-Native {
    # Runs an executable with an argument array (never a command string) and checks its exit code.
    # Its output goes through Write-Line, so that it reaches the transcript; stderr lines too,
    # which Windows PowerShell would otherwise turn into terminating errors under 'Stop'.
    param([string] $FilePath, [string[]] $Arguments)
    $ErrorActionPreference = 'Continue'
    & $FilePath @Arguments 2>&1 | ForEach-Object { Write-Line "$_" }
    if ($LASTEXITCODE -ne 0) {
        throw "$FilePath exited with code $LASTEXITCODE."
    }
}

function Assert-NoQuote {
    # Paths and names go into TOML literal strings and IIS filters: a quote would break out.
    param([string] $What, [string] $Value)
    if ($Value -match "['`r`n]") {
        throw "$What must not contain a quote or a line break: $Value"
    }
}

function Find-Python {
    foreach ($version in $SupportedPython) {
        $key = "HKLM:\SOFTWARE\Python\PythonCore\$version\InstallPath"
        if (Test-Path -LiteralPath $key) {
            $exe = (Get-ItemProperty -LiteralPath $key).ExecutablePath
            if ($exe -and (Test-Path -LiteralPath $exe)) {
                return $exe
            }
        }
    }
    throw 'No 64-bit Python 3.10-3.13 installed for all users was found.'
}

function Find-RemoteExchangePath {
    $root = $env:ExchangeInstallPath
    if (-not $root) {
        $setup = 'HKLM:\SOFTWARE\Microsoft\ExchangeServer\v15\Setup'
        if (Test-Path -LiteralPath $setup) {
            $root = (Get-ItemProperty -LiteralPath $setup).MsiInstallPath
        }
    }
    if (-not $root) {
        throw 'Neither $env:ExchangeInstallPath nor the Exchange Setup registry key names the Exchange folder.'
    }
    return (Join-Path $root 'bin\RemoteExchange.ps1')
}

function ConvertTo-TomlList {
    param([string[]] $Values)
    $quoted = foreach ($value in $Values) { "'" + $value + "'" }
    return '[' + ($quoted -join ', ') + ']'
}

function Get-AccountSid {
    param([string] $Name)
    $account = New-Object System.Security.Principal.NTAccount($Name)
    return $account.Translate([System.Security.Principal.SecurityIdentifier])
}

function Set-FolderAccess {
    # Replaces the folder's ACL: Administrators and SYSTEM full control, the service account
    # $Rights ($null: no service account yet, so Administrators and SYSTEM only).
    param([string] $Path, [System.Security.Principal.SecurityIdentifier] $Account, [string] $Rights)
    $inherit = [System.Security.AccessControl.InheritanceFlags] 'ContainerInherit, ObjectInherit'
    $propagate = [System.Security.AccessControl.PropagationFlags]::None
    $allow = [System.Security.AccessControl.AccessControlType]::Allow
    $admins = New-Object System.Security.Principal.SecurityIdentifier('S-1-5-32-544')
    $system = New-Object System.Security.Principal.SecurityIdentifier('S-1-5-18')
    $acl = New-Object System.Security.AccessControl.DirectorySecurity
    $acl.SetAccessRuleProtection($true, $false)
    $grants = @(@($admins, 'FullControl'), @($system, 'FullControl'))
    if ($null -ne $Account) {
        $grants += , @($Account, $Rights)
    }
    foreach ($grant in $grants) {
        $rights = [System.Security.AccessControl.FileSystemRights] $grant[1]
        $rule = New-Object System.Security.AccessControl.FileSystemAccessRule(
            $grant[0], $rights, $inherit, $propagate, $allow)
        $acl.AddAccessRule($rule)
    }
    Set-Acl -LiteralPath $Path -AclObject $acl
}

function Get-FastCgiTimeouts {
    # The FastCGI timeouts this configuration needs, computed by the service from its own worst
    # case (`vezaprovisioner iis-settings` prints JSON). Under -WhatIf before the venv or the
    # configuration exist, they are shown as still to be computed.
    if (-not (Test-Path -LiteralPath $Cli) -or -not (Test-Path -LiteralPath $ConfigFile)) {
        if ($WhatIfPreference) {
            $later = '(computed by vezaprovisioner iis-settings)'
            return [pscustomobject] @{ requestTimeout = $later; activityTimeout = $later; idleTimeout = $later }
        }
        throw "$Cli or $ConfigFile is missing."
    }
    $ErrorActionPreference = 'Continue'
    $lines = @(& $Cli @('iis-settings', '--config', $ConfigFile) 2>&1)
    $exitCode = $LASTEXITCODE
    $errors = @($lines | Where-Object { $_ -is [System.Management.Automation.ErrorRecord] } | ForEach-Object { "$_" })
    $json = @($lines | Where-Object { $_ -isnot [System.Management.Automation.ErrorRecord] } | ForEach-Object { "$_" })
    if ($exitCode -ne 0) {
        throw "vezaprovisioner iis-settings exited with code ${exitCode}: $($errors -join ' ')"
    }
    return (($json -join [Environment]::NewLine) | ConvertFrom-Json)
}

function Get-PoolAccount {
    # The account a pool runs as, when it is a service account (SpecificUser); '' otherwise.
    param([string] $Pool)
    $model = (Get-Item -LiteralPath "IIS:\AppPools\$Pool").processModel
    if ([string] $model.identityType -eq 'SpecificUser' -and $model.userName) {
        return [string] $model.userName
    }
    return ''
}

function Invoke-Doctor {
    # Under the MSI, the checks that need the pool's service account only warn; every other
    # failed check (configuration, paths, data folder, IIS settings) fails the installation.
    param([string[]] $Arguments)
    if (-not $FromMsi) {
        Invoke-Native $Cli $Arguments
        return
    }
    $ErrorActionPreference = 'Continue'
    $jsonArguments = $Arguments + '--json'
    $output = & $Cli @jsonArguments 2>&1 | ForEach-Object { "$_" }
    $exitCode = $LASTEXITCODE
    try {
        $report = ($output -join [Environment]::NewLine) | ConvertFrom-Json
    }
    catch {
        $output | ForEach-Object { Write-Line $_ }
        throw "vezaprovisioner doctor exited with code $exitCode and printed no report."
    }
    $failed = @()
    $warned = $false
    foreach ($check in $report.checks) {
        $line = '{0,-4}  {1,-14}  {2}' -f ([string] $check.status).ToUpper(), $check.name, $check.detail
        if ($check.status -eq 'fail' -and $IdentityChecks -contains $check.name) {
            $line = 'WARN' + $line.Substring(4)
            $warned = $true
        }
        elseif ($check.status -eq 'fail') {
            $failed += $check.name
        }
        Write-Line $line
        if ($check.fix) {
            Write-Line "                      fix: $($check.fix)"
        }
    }
    if ($warned) {
        Write-Line "    WARN lines: this runs as $([System.Security.Principal.WindowsIdentity]::GetCurrent().Name), not as the pool's service account; run doctor as that account (deploy\iis\README.md, Verify)."
    }
    if ($failed.Count -gt 0) {
        throw ('vezaprovisioner doctor failed: ' + ($failed -join ', ') + '.')
    }
}

try {
    if ($FromMsi -and -not $WhatIfPreference) {
        $rootExisted = Test-Path -LiteralPath $InstallRoot
        Open-Transcript 'install-msi.log'
        $CreatedList = Join-Path $InstallRoot 'logs\created-this-run.txt'
        [System.IO.File]::WriteAllText($CreatedList, '', $Utf8)
        if (-not $rootExisted) {
            Add-Created 'folder' $InstallRoot
        }
        $who = [System.Security.Principal.WindowsIdentity]::GetCurrent().Name
        Write-Line "$(Get-Date -Format o) $PSCommandPath (parameter set $($PSCmdlet.ParameterSetName)), run by Windows Installer as $who"
    }
    if ($PSCmdlet.ParameterSetName -eq 'Gmsa') {
        $AccountName = $GroupManagedServiceAccount
    }
    elseif ($PSCmdlet.ParameterSetName -eq 'Credential') {
        $AccountName = $Credential.UserName
    }
    else {
        $AccountName = ''  # read from the pool once it is known
    }
    foreach ($pair in @(@('-InstallRoot', $InstallRoot), @('-SiteName', $SiteName),
            @('-AppPoolName', $AppPoolName), @('-AccountName', $AccountName))) {
        Assert-NoQuote $pair[0] $pair[1]
    }
    $AllowedUsers = @($AllowedUsers | ForEach-Object { $_ -split ',' } |
        ForEach-Object { $_.Trim() } | Where-Object { $_ })
    foreach ($user in $AllowedUsers) {
        Assert-NoQuote '-AllowedUsers' $user
    }

    Invoke-Step 'Check administrator rights' 'Start PowerShell with "Run as administrator" and run this script again.' {
        $principal = New-Object System.Security.Principal.WindowsPrincipal(
            [System.Security.Principal.WindowsIdentity]::GetCurrent())
        if (-not $principal.IsInRole([System.Security.Principal.WindowsBuiltInRole]::Administrator)) {
            throw 'This PowerShell is not elevated.'
        }
    }

    Invoke-Step 'Check the IIS features (CGI, Basic Authentication, Application Initialization)' 'Run: Install-WindowsFeature Web-CGI, Web-Basic-Auth, Web-AppInit (then run this script again).' {
        Import-Module ServerManager
        $missing = @(Get-WindowsFeature -Name 'Web-CGI', 'Web-Basic-Auth', 'Web-AppInit' | Where-Object { -not $_.Installed })
        if ($missing.Count -gt 0) {
            throw ('Missing: ' + (($missing | ForEach-Object { $_.Name }) -join ', ') + '.')
        }
        Import-Module WebAdministration
    }

    Invoke-Step 'Check the bundle' 'Unpack vezaprovisioner-<version>-win-amd64.zip and run deploy\iis\install.ps1 from inside it, or pass -BundleRoot.' {
        $script:BundleRoot = (Resolve-Path -LiteralPath $BundleRoot).Path
        $script:Wheelhouse = Join-Path $BundleRoot 'wheelhouse'
        $script:Version = (Get-Content -LiteralPath (Join-Path $BundleRoot 'VERSION') -TotalCount 1).Trim()
        foreach ($needed in @($Wheelhouse, (Join-Path $BundleRoot 'web.config'))) {
            if (-not (Test-Path -LiteralPath $needed)) {
                throw "$needed is missing."
            }
        }
        Write-Line "    VezaProvisioner $Version from $BundleRoot"
    }

    Invoke-Step 'Find Python' 'Install 64-bit Python 3.10-3.13 from python.org "for all users", or pass -PythonExe.' {
        if (-not $PythonExe) {
            $script:PythonExe = Find-Python
        }
        Invoke-Native $PythonExe @('-c', 'import sys; assert sys.version_info[:2] >= (3, 10) and sys.maxsize > 2**32, sys.version')
        Write-Line "    $PythonExe"
    }

    Invoke-Step 'Find the Exchange Management Shell paths' 'Pass -PowerShellPath and -RemoteExchangePath: the two paths in the Target of the Exchange Management Shell shortcut.' {
        if (-not $PowerShellPath) {
            $script:PowerShellPath = Join-Path $env:SystemRoot 'System32\WindowsPowerShell\v1.0\powershell.exe'
        }
        if (-not $RemoteExchangePath) {
            $script:RemoteExchangePath = Find-RemoteExchangePath
        }
        foreach ($path in @($PowerShellPath, $RemoteExchangePath)) {
            Assert-NoQuote 'Exchange path' $path
            if (-not (Test-Path -LiteralPath $path -PathType Leaf)) {
                throw "$path does not exist."
            }
        }
        Write-Line "    PowerShell: $PowerShellPath"
        Write-Line "    RemoteExchange.ps1: $RemoteExchangePath"
    }

    if ($KeepPoolIdentity) {
        Invoke-Step 'Find the application pool' "Check the pool of the application '$Location' in IIS Manager, or pass -AppPoolName." {
            # Reuse what the admin built: an application that exists already keeps its pool,
            # unless -AppPoolName names another pool that exists.
            $existing = Get-WebApplication -Site $SiteName -Name $AppName
            if ($existing -and $existing.applicationPool -ne $AppPoolName -and
                -not (Test-Path -LiteralPath "IIS:\AppPools\$AppPoolName")) {
                $script:AppPoolName = [string] $existing.applicationPool
                Assert-NoQuote '-AppPoolName' $AppPoolName
            }
            if (Test-Path -LiteralPath "IIS:\AppPools\$AppPoolName") {
                Write-Line "    reusing the application pool $AppPoolName and its identity"
            }
            else {
                Write-Line "    the application pool $AppPoolName does not exist: it will be created without a service account"
            }
        }
    }
    else {
        Invoke-Step 'Resolve the service account' 'Check the account name (DOMAIN\user) and that this server can reach a domain controller.' {
            $script:AccountSid = Get-AccountSid $AccountName
            Write-Line "    $AccountName ($AccountSid)"
        }
    }

    Invoke-Step 'Create the folders' "Check that $InstallRoot is on a local NTFS disk you can write to." {
        foreach ($dir in @($InstallRoot, $AppDir, $ConfigDir, $DataDir)) {
            if (-not (Test-Path -LiteralPath $dir) -and $PSCmdlet.ShouldProcess($dir, 'Create folder')) {
                New-Item -ItemType Directory -Path $dir | Out-Null
                Add-Created 'folder' $dir
            }
        }
    }

    Invoke-Step 'Install VezaProvisioner from the wheelhouse (offline)' 'Check that the bundle matches this Python version (3.10-3.13, 64-bit); delete the venv folder and run again if it is damaged.' {
        if (-not (Test-Path -LiteralPath $VenvPython) -and $PSCmdlet.ShouldProcess($VenvDir, 'Create virtual environment')) {
            Invoke-Native $PythonExe @('-m', 'venv', $VenvDir)
            Add-Created 'folder' $VenvDir
        }
        # Windows keeps loaded .pyd files locked: an upgrade stops the pool's processes first.
        if ((Test-Path -LiteralPath "IIS:\AppPools\$AppPoolName") -and
            (Get-WebAppPoolState -Name $AppPoolName).Value -ne 'Stopped' -and
            $PSCmdlet.ShouldProcess($AppPoolName, 'Stop application pool for the upgrade')) {
            Stop-WebAppPool -Name $AppPoolName
            $deadline = (Get-Date).AddSeconds(60)
            while ((Get-WebAppPoolState -Name $AppPoolName).Value -ne 'Stopped') {
                if ((Get-Date) -gt $deadline) {
                    throw "The application pool $AppPoolName did not stop within 60 seconds."
                }
                Start-Sleep -Seconds 1
            }
        }
        if ($PSCmdlet.ShouldProcess($VenvDir, "Install vezaprovisioner $Version from $Wheelhouse")) {
            # Exactly the bundle's pins for this Python (requirements-cp3XY.txt), each wheel
            # checked against its SHA-256: nothing else, nothing from the network.
            $tag = (& $VenvPython -c 'import sys; print(''cp{0}{1}''.format(*sys.version_info))' | Select-Object -First 1)
            $requirements = Join-Path $BundleRoot "requirements-$tag.txt"
            if ($LASTEXITCODE -ne 0 -or -not (Test-Path -LiteralPath $requirements)) {
                throw "The bundle has no pinned requirements for this Python ($tag): $requirements."
            }
            Invoke-Native $VenvPython @('-m', 'pip', 'install', '--no-index', '--find-links', $Wheelhouse,
                '--require-hashes', '--only-binary', ':all:', '--disable-pip-version-check', '-r', $requirements)
            if (-not (Test-Path -LiteralPath $WfastcgiPy)) {
                throw "$WfastcgiPy is missing after the install."
            }
            $installed = (& $VenvPython -c 'import importlib.metadata as m; print(m.version(''vezaprovisioner''))' | Select-Object -First 1)
            if ($LASTEXITCODE -ne 0 -or "$installed".Trim() -ne $Version) {
                throw "The venv holds vezaprovisioner $installed, but the bundle's VERSION says $Version."
            }
        }
    }

    Invoke-Step 'Write the configuration' "Fix or delete $ConfigFile and run again." {
        if (Test-Path -LiteralPath $ConfigFile) {
            Write-Line "    kept the existing $ConfigFile (delete it to have it written again)"
        }
        elseif ($PSCmdlet.ShouldProcess($ConfigFile, 'Write configuration')) {
            # A template with literal placeholders (String.Replace, not a regex, not code).
            $text = Get-Content -LiteralPath (Join-Path $PSScriptRoot 'vezaprovisioner.toml.template') -Raw
            $values = [ordered]@{
                '{{APP_NAME}}'             = $AppName
                '{{DATA_DIR}}'             = $DataDir
                '{{POWERSHELL_PATH}}'      = $PowerShellPath
                '{{REMOTE_EXCHANGE_PATH}}' = $RemoteExchangePath
                '{{ALLOWED_USERS}}'        = (ConvertTo-TomlList $AllowedUsers)
            }
            foreach ($placeholder in $values.Keys) {
                $text = $text.Replace($placeholder, [string] $values[$placeholder])
            }
            $utf8 = New-Object System.Text.UTF8Encoding($false)
            [System.IO.File]::WriteAllText($ConfigFile, $text, $utf8)
            Add-Created 'file' $ConfigFile
        }
    }

    Invoke-Step 'Lay down web.config' "Check that $AppDir is writable and that the bundle's web.config is intact." {
        if ($PSCmdlet.ShouldProcess((Join-Path $AppDir 'web.config'), 'Write web.config')) {
            $xml = New-Object System.Xml.XmlDocument
            $xml.PreserveWhitespace = $true
            $xml.Load((Join-Path $BundleRoot 'web.config'))
            $values = @{
                'PYTHONPATH'             = $SitePackages
                'VEZAPROVISIONER_CONFIG' = $ConfigFile
            }
            foreach ($add in $xml.SelectNodes('/configuration/appSettings/add')) {
                $key = $add.GetAttribute('key')
                if ($values.ContainsKey($key)) {
                    $add.SetAttribute('value', $values[$key])
                }
            }
            $handler = $xml.SelectSingleNode('/configuration/system.webServer/handlers/add')
            $handler.SetAttribute('scriptProcessor', "$VenvPython|$WfastcgiPy")
            $xml.Save((Join-Path $AppDir 'web.config'))
        }
    }

    Invoke-Step 'Register the FastCGI application' 'Check that applicationHost.config is not locked by another tool (close IIS Manager) and run again.' {
        $fastCgi = Get-WebConfiguration -PSPath $AppHost -Filter 'system.webServer/fastCgi/application' |
            Where-Object { $_.fullPath -eq $VenvPython -and $_.arguments -eq $WfastcgiPy }
        if (-not $fastCgi -and $PSCmdlet.ShouldProcess("$VenvPython|$WfastcgiPy", 'Register FastCGI application')) {
            Add-WebConfigurationProperty -PSPath $AppHost -Filter 'system.webServer/fastCgi' -Name '.' -Value @{
                fullPath  = $VenvPython
                arguments = $WfastcgiPy
            }
            Add-Created 'fastcgi' "$VenvPython|$WfastcgiPy"
        }
        $entry = "system.webServer/fastCgi/application[@fullPath='$VenvPython' and @arguments='$WfastcgiPy']"
        # IIS must never end a request the service is still working on: the request and
        # activity timeouts come from the configuration's worst case (3 x the command timeout
        # + the not-found wait + the host queue wait + the claim wait, with margin); the idle
        # timeout is IIS's maximum, because the warm PowerShell pool is what makes it fast.
        $timeouts = Get-FastCgiTimeouts
        Write-Line "    requestTimeout and activityTimeout $($timeouts.requestTimeout) s, idleTimeout $($timeouts.idleTimeout) s"
        $tuning = [ordered]@{
            maxInstances                 = 4
            instanceMaxRequests          = 10000
            activityTimeout              = $timeouts.activityTimeout
            requestTimeout               = $timeouts.requestTimeout
            idleTimeout                  = $timeouts.idleTimeout
            signalBeforeTerminateSeconds = 30
            stderrMode                   = 'ReturnGeneric500'
            protocol                     = 'NamedPipe'
        }
        foreach ($name in $tuning.Keys) {
            if ($PSCmdlet.ShouldProcess("FastCGI $name", "Set to $($tuning[$name])")) {
                Set-WebConfigurationProperty -PSPath $AppHost -Filter $entry -Name $name -Value $tuning[$name]
            }
        }
    }

    Invoke-Step 'Create the application pool' 'Check the service account name and password (Get-Credential), and that the account may log on as a batch job.' {
        $poolPath = "IIS:\AppPools\$AppPoolName"
        if (-not (Test-Path -LiteralPath $poolPath) -and $PSCmdlet.ShouldProcess($AppPoolName, 'Create application pool')) {
            New-WebAppPool -Name $AppPoolName | Out-Null
            # uninstall.ps1 removes only a pool this file names: never one the admin built.
            [System.IO.File]::WriteAllText($PoolMarker, $AppPoolName, $Utf8)
            Add-Created 'pool' $AppPoolName
        }
        if ($KeepPoolIdentity -and $PSCmdlet.ShouldProcess($AppPoolName, 'No Managed Code, load user profile (identity unchanged)')) {
            Set-ItemProperty -LiteralPath $poolPath -Name managedRuntimeVersion -Value ''
            Set-ItemProperty -LiteralPath $poolPath -Name enable32BitAppOnWin64 -Value $false
            Set-ItemProperty -LiteralPath $poolPath -Name processModel.loadUserProfile -Value $true
            Set-ItemProperty -LiteralPath $poolPath -Name processModel.setProfileEnvironment -Value $true
            Set-ItemProperty -LiteralPath $poolPath -Name processModel.idleTimeout -Value ([TimeSpan]::Zero)
            # Application Initialization: start the pool (and warm the service) before any caller.
            Set-ItemProperty -LiteralPath $poolPath -Name startMode -Value 'AlwaysRunning'
        }
        elseif ($PSCmdlet.ShouldProcess($AppPoolName, "Run as $AccountName, No Managed Code, load user profile")) {
            Set-ItemProperty -LiteralPath $poolPath -Name managedRuntimeVersion -Value ''
            Set-ItemProperty -LiteralPath $poolPath -Name enable32BitAppOnWin64 -Value $false
            # RemoteExchange.ps1 caches its proxy module in the account's profile
            # (%APPDATA%\Microsoft\Exchange\RemotePowerShell): load the profile and point the
            # process's environment (APPDATA, USERPROFILE, TEMP) at it.
            Set-ItemProperty -LiteralPath $poolPath -Name processModel.loadUserProfile -Value $true
            Set-ItemProperty -LiteralPath $poolPath -Name processModel.setProfileEnvironment -Value $true
            # Keep the process (and its warm Exchange session) instead of idling it out.
            Set-ItemProperty -LiteralPath $poolPath -Name processModel.idleTimeout -Value ([TimeSpan]::Zero)
            # Application Initialization: start the pool (and warm the service) before any caller.
            Set-ItemProperty -LiteralPath $poolPath -Name startMode -Value 'AlwaysRunning'
            if ($PSCmdlet.ParameterSetName -eq 'Gmsa') {
                Set-ItemProperty -LiteralPath $poolPath -Name processModel -Value @{
                    identityType = 'SpecificUser'; userName = $AccountName; password = '' }
            }
            else {
                # Handed straight to IIS, which stores it encrypted; never kept in a variable.
                Set-ItemProperty -LiteralPath $poolPath -Name processModel -Value @{
                    identityType = 'SpecificUser'; userName = $AccountName
                    password     = $Credential.GetNetworkCredential().Password }
            }
        }
    }

    if ($KeepPoolIdentity) {
        Invoke-Step 'Read the application pool identity' "Check the identity of the pool $AppPoolName in IIS Manager (Advanced Settings, Identity): DOMAIN\user, and that this server can reach a domain controller." {
            if (Test-Path -LiteralPath "IIS:\AppPools\$AppPoolName") {
                $script:AccountName = Get-PoolAccount $AppPoolName
            }
            if ($AccountName) {
                $script:AccountSid = Get-AccountSid $AccountName
                Write-Line "    $AccountName ($AccountSid)"
            }
            else {
                $script:AccountSid = $null
                $script:PendingIdentity = "The application pool $AppPoolName has no service account yet, so the service cannot reach Exchange. " +
                "Set it with: deploy\iis\install.ps1 -Credential (Get-Credential DOMAIN\svc-veza) -InstallRoot $InstallRoot -SiteName '$SiteName' -AppName $AppName -AppPoolName $AppPoolName " +
                "(it also grants the account its folder permissions). Or set it in IIS Manager (Application Pools, $AppPoolName, Advanced Settings, Identity), " +
                'then repair VezaProvisioner in Programs and Features (or run install.ps1 -KeepPoolIdentity again) so that the folder permissions follow it.'
                Write-Line "    no service account yet: $PendingIdentity"
            }
        }
    }

    Invoke-Step 'Create the application' "Check that the site '$SiteName' exists (pass -SiteName otherwise)." {
        if (-not (Test-Path -LiteralPath "IIS:\Sites\$SiteName")) {
            throw "There is no IIS site named '$SiteName'."
        }
        $existing = Get-WebApplication -Site $SiteName -Name $AppName
        if (-not $existing) {
            if ($PSCmdlet.ShouldProcess($Location, 'Create application')) {
                New-WebApplication -Site $SiteName -Name $AppName -PhysicalPath $AppDir -ApplicationPool $AppPoolName | Out-Null
                Add-Created 'application' $Location
            }
        }
        elseif ($PSCmdlet.ShouldProcess($Location, "Point at $AppDir in pool $AppPoolName")) {
            Set-ItemProperty -LiteralPath "IIS:\Sites\$SiteName\$AppName" -Name physicalPath -Value $AppDir
            Set-ItemProperty -LiteralPath "IIS:\Sites\$SiteName\$AppName" -Name applicationPool -Value $AppPoolName
        }
        # web.config's applicationInitialization page is requested whenever the pool starts.
        if ($PSCmdlet.ShouldProcess($Location, 'Set preloadEnabled (Application Initialization)')) {
            Set-ItemProperty -LiteralPath "IIS:\Sites\$SiteName\$AppName" -Name preloadEnabled -Value $true
        }
    }

    Invoke-Step 'Set Anonymous off, Basic on, Require SSL' 'Check that the site has an HTTPS binding with a certificate (Exchange sets one up) and run again.' {
        $sections = [ordered]@{
            'system.webServer/security/authentication/anonymousAuthentication' = @{ enabled = $false }
            'system.webServer/security/authentication/windowsAuthentication'   = @{ enabled = $false }
            'system.webServer/security/authentication/basicAuthentication'     = @{ enabled = $true }
            'system.webServer/security/access'                                 = @{ sslFlags = 'Ssl' }
        }
        if ($DefaultLogonDomain) {
            $sections['system.webServer/security/authentication/basicAuthentication']['defaultLogonDomain'] = $DefaultLogonDomain
        }
        foreach ($filter in $sections.Keys) {
            foreach ($name in $sections[$filter].Keys) {
                $value = $sections[$filter][$name]
                if ($PSCmdlet.ShouldProcess("$Location $filter", "Set $name to $value")) {
                    Set-WebConfigurationProperty -PSPath $AppHost -Location $Location -Filter $filter -Name $name -Value $value
                }
            }
        }
    }

    Invoke-Step 'Let the warm-up request in' 'Check that the IIS feature Application Initialization (Web-AppInit) is installed and run again.' {
        # Application Initialization requests web.config's initializationPage anonymously and
        # over plain HTTP; only that path is opened. It reads nothing and answers 204, no body.
        $warmup = "$Location/warmup"
        $sections = [ordered]@{
            'system.webServer/security/authentication/anonymousAuthentication' = @{ enabled = $true }
            'system.webServer/security/access'                                 = @{ sslFlags = 'None' }
        }
        foreach ($filter in $sections.Keys) {
            foreach ($name in $sections[$filter].Keys) {
                $value = $sections[$filter][$name]
                if ($PSCmdlet.ShouldProcess("$warmup $filter", "Set $name to $value")) {
                    Set-WebConfigurationProperty -PSPath $AppHost -Location $warmup -Filter $filter -Name $name -Value $value
                }
            }
        }
    }

    Invoke-Step 'Set least-privilege folder permissions' "Check that $InstallRoot is on NTFS and that you own it." {
        if ($PSCmdlet.ShouldProcess($InstallRoot, "Read and execute for '$AccountName'; Modify on $DataDir")) {
            Set-FolderAccess -Path $InstallRoot -Account $AccountSid -Rights 'ReadAndExecute'
            Set-FolderAccess -Path $DataDir -Account $AccountSid -Rights 'Modify'
        }
    }

    Invoke-Step 'Restart the application pool' "Start it in IIS Manager and read the System event log (source WAS) for why it stopped." {
        if ($PSCmdlet.ShouldProcess($AppPoolName, 'Restart application pool')) {
            if ((Get-WebAppPoolState -Name $AppPoolName).Value -eq 'Started') {
                Restart-WebAppPool -Name $AppPoolName
            }
            else {
                Start-WebAppPool -Name $AppPoolName
            }
        }
    }

    Invoke-Step 'Run the self-test (vezaprovisioner doctor)' 'Fix what the FAIL lines above say, then run this script again.' {
        if ($PSCmdlet.ShouldProcess($ConfigFile, 'Run vezaprovisioner doctor')) {
            $doctorArguments = @('doctor', '--config', $ConfigFile, '--site', $SiteName)
            if ($TestIdentity) {
                $doctorArguments += @('--identity', $TestIdentity)
            }
            Invoke-Doctor $doctorArguments
        }
    }

    # The name on the site's certificate (-PublicHostName), else this computer's DNS name.
    $hostName = $PublicHostName
    if (-not $hostName) {
        $hostName = [System.Net.Dns]::GetHostEntry('').HostName
    }
    Write-Line ''
    Write-Line 'VezaProvisioner is installed. Enter these values in Veza (Exchange Server integration):'
    Write-Line "    Instance URL:         https://$hostName/$AppName"
    Write-Line "    PowerShell Path:      $PowerShellPath"
    Write-Line "    Remote Exchange Path: $RemoteExchangePath"
    if ($PendingIdentity) {
        Write-Line ''
        Write-Line "ACTION NEEDED: $PendingIdentity"
    }
    if ($LogFile) {
        Write-Line "This transcript: $LogFile"
    }
    if ($CreatedList) {
        # Succeeded: nothing to roll back. A list left over would make a later rollback remove
        # what this run created, should the next run fail before it starts its own list.
        [System.IO.File]::Delete($CreatedList)
    }
}
catch {
    Write-Line ''
    if ($LogFile) {
        [System.IO.File]::AppendAllText($LogFile, "FAILED: $($_.Exception.Message)" + [Environment]::NewLine, $Utf8)
    }
    Write-Error -Message $_.Exception.Message -ErrorAction Continue
    exit 1
}
